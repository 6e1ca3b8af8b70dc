"""Hostile and broken input against the real `modgate serve-events` on real Redis: bodies
the queue model refuses, wrong types, absurd numbers and nesting, control characters,
garbled signatures, stalled and unauthenticated uploads, the OpenAPI contract (and a
bounded Schemathesis run against it), and the documented samples of each S3-compatible
store (tests/fixtures/events/)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis

from tests.integration.test_producers import minio_body, queued_keys
from tests.servers import RedisServer, free_port

MODGATE = [sys.executable, "-m", "worker.cli"]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "events"
TOKEN = "tok-123"
HMAC_SECRET = "hmac-key-0123456789"


class Receiver:
    """`modgate serve-events` as a subprocess; its log goes to a file the test can read."""

    def __init__(self, redis_url: str, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {
            **os.environ,
            "MODGATE_REDIS__URL": redis_url,
            "MODGATE_WORKER__LOG_FORMAT": "text",
            **env,
        }
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*MODGATE, "serve-events", "--host", "127.0.0.1", "--port", str(self.port)],
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.base + "/healthz", timeout=1)
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"receiver did not start: {self.log()}") from None
                time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def own_redis(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def start(own_redis, tmp_path):
    started: list[Receiver] = []

    def _start(token: bool = True, **env: str) -> Receiver:
        env = {"MODGATE_RECEIVER__TOKEN": TOKEN, **env} if token else env
        receiver = Receiver(own_redis.url, tmp_path / f"receiver-{len(started)}.log", **env)
        started.append(receiver)
        return receiver

    yield _start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def receiver(start):
    return start()


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared(shared_redis, tmp_path_factory):
    """One receiver for the tests whose requests never enqueue anything (all refused)."""
    receiver = Receiver(
        shared_redis.url, tmp_path_factory.mktemp("receiver") / "log", MODGATE_RECEIVER__TOKEN=TOKEN
    )
    yield receiver
    receiver.stop()


def post(url: str, body, headers: dict[str, str] | None = None, token: str | None = TOKEN):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def record(bucket="allowed-bucket", key="a.jpg", **obj):
    return {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "eventName": "s3:ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 3, "eTag": "e", **obj}},
    }


def fixture(name: str) -> dict:
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


# -- bad data is the sender's error (400), never "retry later" (503) or a crash (500) -------


@pytest.mark.parametrize(
    "bad",
    [
        record(bucket="ab"),
        record(key=""),
        record(key="k" * 1025),
        record(size=-1),
    ],
    ids=["bucket under 3 chars", "empty key", "key over 1024", "negative size"],
)
def test_what_the_queue_model_refuses_is_a_400_while_redis_is_fine(shared, shared_redis, bad):
    status, body = post(shared.base + "/events", {"Records": [bad]})
    assert status == 400, body
    assert body["invalid_records"][0]["record"] == "Records[0]"
    assert redis.Redis.from_url(shared_redis.url).llen("modgate") == 0


WRONG = {
    "key not a string": json.dumps({"Records": [record(key=12)]}),
    "eTag not a string": json.dumps({"Records": [record(eTag={"x": 1})]}),
    "s3.object not an object": json.dumps(
        {"Records": [{**record(), "s3": {"bucket": {"name": "abc"}, "object": "x"}}]}
    ),
    "Sns not an object": json.dumps({"Records": [{"EventSource": "aws:sns", "Sns": "x"}]}),
    "size 1e400": json.dumps({"Records": [record()]}).replace('"size": 3', '"size": 1e400'),
    "20,000-deep JSON": '{"Records": [' + '{"a":' * 20_000 + "1" + "}" * 20_000 + "]}",
    "20,000-deep array": "[" * 20_000 + "]" * 20_000,
}


@pytest.mark.parametrize("name", WRONG, ids=list(WRONG))
def test_wrong_types_huge_numbers_and_deep_nesting_are_400(shared, name):
    status, body = post(shared.base + "/events", WRONG[name].encode())
    assert status == 400, body
    assert shared.proc.poll() is None


def test_one_bad_record_does_not_poison_its_batch(receiver, own_redis):
    body = {"Records": [record(key="good%201.jpg"), record(bucket="ab"), record(key="good+2.jpg")]}
    status, answer = post(receiver.base + "/events", body)
    assert status == 202, answer
    assert (answer["enqueued"], answer["invalid"]) == (2, 1)
    assert [r["record"] for r in answer["invalid_records"]] == ["Records[1]"]
    assert sorted(queued_keys(redis.Redis.from_url(own_redis.url))) == ["good 1.jpg", "good 2.jpg"]
    assert "invalid record Records[1]" in receiver.log()


CONTROL_KEYS = {"a%00b.jpg": "a\x00b.jpg", "line%0Abreak.jpg": "line\nbreak.jpg", "tab%09.jpg": "tab\t.jpg"}
CONTROL_KEYS |= {
    "del%7F.jpg": "del\x7f.jpg",
    "c1%C2%85.jpg": "c1\x85.jpg",
    "esc%1B%5B2J.jpg": "esc\x1b[2J.jpg",
}


def test_keys_with_control_characters_are_enqueued_exactly(receiver, own_redis):
    # S3 stores them; refusing them would leave those uploads unmoderated.
    body = {"Records": [record(key=k) for k in CONTROL_KEYS]}
    status, answer = post(receiver.base + "/events", body)
    assert status == 202 and (answer["enqueued"], answer["invalid"]) == (6, 0), answer
    assert queued_keys(redis.Redis.from_url(own_redis.url)) == list(CONTROL_KEYS.values())
    # Otherwise invalid, they are still refused, and the log line about it stays one line.
    status, answer = post(receiver.base + "/events", {"Records": [record(key="%0A" * 1025)]})
    assert status == 400 and answer["invalid_records"][0]["record"] == "Records[0]"
    assert "\x1b" not in receiver.log() and "\x00" not in receiver.log()


# -- credentials ------------------------------------------------------------------------


def test_garbled_or_non_ascii_signature_is_401(start):
    receiver = start(token=False, MODGATE_RECEIVER__HMAC_SECRET=HMAC_SECRET)
    for signature in ["t=1,v1=é", "t=ü", "garbage", "t=1", f"t={10**40},v1={'a' * 64}"]:
        status, body = post(
            receiver.base + "/events", minio_body(["a.jpg"]), {"Modgate-Signature": signature}, None
        )
        assert status == 401, (signature, body)
    assert receiver.proc.poll() is None


def raw_request(port: int, headers: str, body: bytes = b"", wait: float = 20.0) -> bytes:
    """Send a request as given (a body may stop short) and return all the server sends
    until it closes the connection; raises TimeoutError if it neither answers nor closes."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(headers.encode() + body)
        sock.settimeout(wait)
        out = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_token_is_checked_before_the_body_is_read(receiver):
    # Headers of a 1 MB upload and not one byte of it: the answer must not wait for it.
    headers = "POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
    answer = raw_request(receiver.port, headers)
    assert answer.startswith(b"HTTP/1.1 401")
    answer = raw_request(receiver.port, headers.replace("Host: x", "Host: x\r\nAuthorization: Bearer nope"))
    assert answer.startswith(b"HTTP/1.1 403")


def test_a_stalled_upload_is_closed_at_the_body_deadline(start):
    receiver = start(MODGATE_RECEIVER__BODY_TIMEOUT_S="1")
    headers = (
        f"POST /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 5000\r\n\r\n"
    )
    answer = raw_request(receiver.port, headers, b'{"Records": [')  # then nothing more
    assert answer.startswith(b"HTTP/1.1 408") and b"connection: close" in answer.lower()


def test_a_request_head_that_never_completes_is_closed_at_the_header_deadline(start, own_redis):
    receiver = start(MODGATE_RECEIVER__HEADER_TIMEOUT_S="1")
    # Half a request line, then nothing (slowloris): closed without an answer. The socket
    # timeout is far above the deadline: without one, recv raises TimeoutError instead.
    with socket.create_connection(("127.0.0.1", receiver.port)) as sock:
        sock.sendall(b"POST /eve")
        sock.settimeout(20)
        assert sock.recv(65536) == b""
    # Also on a kept-alive connection, whose keep-alive timer the next request's first
    # byte stops: the deadline runs from the previous response.
    conn = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=20)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("connection") != "close"
        response.read()
        assert conn.sock is not None
        conn.sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line
        assert conn.sock.recv(65536) == b""
    finally:
        conn.close()
    # A request whose head is complete is served as before.
    status, body = post(receiver.base + "/events", {"Records": [record(key="after.jpg")]})
    assert status == 202, body
    assert queued_keys(redis.Redis.from_url(own_redis.url)) == ["after.jpg"]


def test_bodies_in_flight_are_capped_across_connections(start):
    receiver = start(MODGATE_RECEIVER__BODY_TIMEOUT_S="3", MODGATE_RECEIVER__MAX_BUFFERED_BYTES=str(2**20))

    def headers(length: int) -> bytes:
        auth = f"Authorization: Bearer {TOKEN}"
        return f"POST /events HTTP/1.1\r\nHost: x\r\n{auth}\r\nContent-Length: {length}\r\n\r\n".encode()

    with socket.create_connection(("127.0.0.1", receiver.port)) as first:
        first.sendall(headers(2**20) + b" " * (2**20 - 600))  # then stalls, holding ~1 MiB
        time.sleep(1)  # ordering only: let the receiver take in the first body
        # A small second body (read whole, so the answer is not lost to a reset) is over the cap.
        answer = raw_request(receiver.port, headers(1000).decode(), b" " * 1000)
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 5" in answer.lower()
        first.settimeout(20)
        assert first.recv(65536).startswith(b"HTTP/1.1 408")


def buffered_bytes(receiver: Receiver) -> float:
    _, raw = get(receiver.base + "/metrics")
    (line,) = [x for x in raw.decode().splitlines() if x.startswith("modgate_receiver_buffered_bytes ")]
    return float(line.split()[1])


def test_strangers_with_made_up_signatures_cannot_crowd_out_a_signed_event(start, own_redis):
    from modgate.signing import sign

    cap = 2**20
    receiver = start(
        token=False,
        MODGATE_RECEIVER__HMAC_SECRET=HMAC_SECRET,
        MODGATE_RECEIVER__MAX_BUFFERED_BYTES=str(cap),
        MODGATE_RECEIVER__MAX_BODY_BYTES=str(512 * 1024),
        MODGATE_RECEIVER__BODY_TIMEOUT_S="120",
    )
    # A signature of the right form and time passes the header check; only the body's MAC
    # could tell it from a real one.
    made_up = f"t={int(time.time())},v1={'0' * 64}"
    head = (
        f"POST /events HTTP/1.1\r\nHost: x\r\nModgate-Signature: {made_up}\r\n"
        f"Content-Length: {512 * 1024}\r\n\r\n"
    )
    strangers: list[socket.socket] = []
    try:
        for _ in range(64):  # 64 x 64 KiB of 512 KiB bodies, then they stall: 4x the buffer
            sock = socket.create_connection(("127.0.0.1", receiver.port))
            strangers.append(sock)
            with contextlib.suppress(OSError):  # shed and closed already
                sock.sendall(head.encode() + b" " * (64 * 1024))
        deadline = time.monotonic() + 30
        while buffered_bytes(receiver) < cap / 2:  # the strangers' bytes are in
            assert time.monotonic() < deadline, "the strangers' bodies never filled the buffer"
            time.sleep(0.05)
        assert buffered_bytes(receiver) <= cap
        body = json.dumps(minio_body(["signed.jpg"])).encode()
        signed = {"Modgate-Signature": sign(HMAC_SECRET, body, int(time.time()))}
        status, answer = post(receiver.base + "/events", body, signed, token=None)
        assert status == 202, answer
        assert queued_keys(redis.Redis.from_url(own_redis.url)) == ["signed.jpg"]
        assert buffered_bytes(receiver) <= cap and receiver.proc.poll() is None
    finally:
        for sock in strangers:
            sock.close()


def test_unsigned_stalled_upload_with_hmac_is_refused_without_reading(start):
    receiver = start(token=False, MODGATE_RECEIVER__HMAC_SECRET=HMAC_SECRET)
    headers = "POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
    assert raw_request(receiver.port, headers).startswith(b"HTTP/1.1 401")
    stale = f"t={int(time.time()) - 3600},v1={'0' * 64}"
    answer = raw_request(receiver.port, headers.replace("Host: x", f"Host: x\r\nModgate-Signature: {stale}"))
    assert answer.startswith(b"HTTP/1.1 403")


# -- the contract -------------------------------------------------------------------------


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_docs_are_off_unless_enabled_and_openapi_declares_the_contract(start):
    receiver = start(MODGATE_RECEIVER__HMAC_SECRET=HMAC_SECRET)
    assert get(receiver.base + "/docs")[0] == 404 and get(receiver.base + "/redoc")[0] == 404
    status, raw = get(receiver.base + "/openapi.json")
    assert status == 200
    schema = json.loads(raw)
    post_op = schema["paths"]["/events"]["post"]
    refs = [s["$ref"] for s in post_op["requestBody"]["content"]["application/json"]["schema"]["anyOf"]]
    assert refs == [
        "#/components/schemas/S3Notification",
        "#/components/schemas/SnsEnvelope",
        "#/components/schemas/EventBridgeEvent",
    ]
    components = schema["components"]
    assert {"S3Record", "S3Object", "S3Bucket"} <= set(components["schemas"])
    assert components["securitySchemes"]["bearerToken"] == {"type": "http", "scheme": "bearer"}
    assert components["securitySchemes"]["modgateSignature"]["name"] == "Modgate-Signature"
    assert post_op["security"] == [{"bearerToken": [], "modgateSignature": []}]
    assert get(receiver.base + "/metrics")[0] == 200  # see README: unauthenticated, counters only

    with_docs = start(MODGATE_RECEIVER__DOCS="true", MODGATE_RECEIVER__METRICS="false")
    assert get(with_docs.base + "/docs")[0] == 200 and get(with_docs.base + "/redoc")[0] == 200
    assert get(with_docs.base + "/metrics")[0] == 404


def test_schemathesis_finds_no_server_error(receiver, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            receiver.base + "/openapi.json",
            "--checks",
            "not_a_server_error,status_code_conformance,response_schema_conformance",
            "--max-examples",
            "40",
            "--seed",
            "1",
            "--workers",
            "1",
            "--no-shrink",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        cwd=tmp_path,  # its example database stays out of the work tree
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "Tested: 2" in out.stdout and "No issues found" in out.stdout  # /events and /healthz


# -- real samples of each store -----------------------------------------------------------


def test_minio_metadata_changes_do_not_trigger_moderation(shared, shared_redis):
    for name in ("minio_put_tagging", "minio_delete_tagging", "minio_put_retention", "minio_put_legal_hold"):
        status, answer = post(shared.base + "/events", fixture(name))
        assert status == 202 and (answer["enqueued"], answer["ignored"]) == (0, 1), (name, answer)
    assert redis.Redis.from_url(shared_redis.url).llen("modgate") == 0


def test_each_store_keys_arrive_as_stored(receiver, own_redis):
    for name in ("ceph_rgw_put", "minio_put", "aws_s3_put"):
        status, answer = post(receiver.base + "/events", fixture(name))
        assert status == 202 and answer["invalid"] == 0, answer
    assert sorted(queued_keys(redis.Redis.from_url(own_redis.url))) == sorted(
        [
            "recordings/80ae9fe5-639a-438b-b86e-9e3dd2d55f4d.mp4",
            "photos/a+b 100%.jpg",  # Ceph: not URL-decoded
            "5cdfb588cea4de1db3034a87/colors.xml",
            "5cdfb588cea4de1db3034a87/my photo+1.jpg",
            "HappyFace.jpg",
            "red flower.jpg",
        ]
    )
