"""The lean S3 GET client (worker/ingest/s3_get.py): SigV4 against AWS's published examples and
botocore's own signer, URLs against botocore's, and against a real moto server (directly
and behind the fault proxy) the same answers and the same fetch.py classification as
the botocore client it stands in for."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import threading

import boto3
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.config import Config
from botocore.credentials import Credentials

from modgate.errors import ErrorCode, ModerationError
from modgate.settings import S3Settings
from modgate.verdict import Source
from tests.faults.proxy import S3_SLOW_DOWN, Fault, FaultProxy
from worker.ingest.fetch import Fetcher, _Transient
from worker.ingest.s3_get import UNSIGNED_PAYLOAD, LeanS3Client, SigV4Signer, encode_key

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
KEYS = [
    "plain.jpg",
    "dir/sub dir/with space.jpg",
    "unicode/ünïcødé-画像.png",
    "a+b%20c=d&e?f#g.jpg",
    "tilde~star*bang!quote'(paren).jpg",
    "../dots/./x..y/.jpg",
    "//double//slash/",
]


# -- SigV4 ------------------------------------------------------------------------------


def test_sigv4_get_vanilla_from_the_aws_test_suite():
    signer = SigV4Signer("us-east-1", "service")
    auth = signer.authorization(
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        "GET",
        "/",
        "",
        {"host": "example.amazonaws.com", "x-amz-date": "20150830T123600Z"},
        EMPTY_SHA256,
        "20150830T123600Z",
    )
    assert auth == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, "
        "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    )


def test_sigv4_s3_get_object_example_from_the_s3_docs():
    signer = SigV4Signer("us-east-1", "s3")
    headers = {
        "host": "examplebucket.s3.amazonaws.com",
        "range": "bytes=0-9",
        "x-amz-content-sha256": EMPTY_SHA256,
        "x-amz-date": "20130524T000000Z",
    }
    auth = signer.authorization(
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "GET",
        "/test.txt",
        "",
        headers,
        EMPTY_SHA256,
        "20130524T000000Z",
    )
    assert auth.endswith("Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
    assert "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date," in auth


def lean_client(endpoint_url=None, region="eu-west-1", token=None, **settings):
    session = boto3.session.Session(
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        aws_session_token=token,
        region_name=region,
    )
    s = S3Settings(endpoint_url=endpoint_url, region=region, **settings)
    botocore_client = session.client(
        "s3", endpoint_url=endpoint_url, config=Config(retries={"total_max_attempts": 1})
    )
    return LeanS3Client(botocore_client, session.get_credentials(), s), botocore_client


@pytest.mark.parametrize("token", [None, "FQoGZXIvYXdzE//token+with/odd=chars"])
@pytest.mark.parametrize("key", KEYS)
def test_authorization_equals_botocores_s3_signer(key, token):
    lean, _ = lean_client(token=token)
    amz_date = "20260102T030405Z"
    _, target, headers = lean.sign_get("my-bucket", key, "v1+/=", amz_date=amz_date)
    request = AWSRequest(
        method="GET",
        url=f"https://{headers['host']}{target}",
        headers={"x-amz-checksum-mode": "ENABLED"},
    )
    request.context["client_config"] = Config(s3={"payload_signing_enabled": False})
    auth = S3SigV4Auth(
        Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token), "s3", "eu-west-1"
    )
    fixed = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ")
    import botocore.auth

    original = botocore.auth.get_current_datetime
    botocore.auth.get_current_datetime = lambda: fixed
    try:
        auth.add_auth(request)
    finally:
        botocore.auth.get_current_datetime = original
    assert request.headers["X-Amz-Content-SHA256"] == UNSIGNED_PAYLOAD == headers["x-amz-content-sha256"]
    assert headers["authorization"] == request.headers["Authorization"]
    assert headers.get("x-amz-security-token") == token


def botocore_url(client, bucket, key, version_id=None):
    """The URL botocore's own client would GET (captured before it is sent)."""
    seen = []

    def capture(request, **_):
        seen.append(request.url)
        return AWSResponse(request.url, 200, {"Content-Length": "0"}, None)

    client.meta.events.register("before-send.s3.GetObject", capture)
    kwargs = {"Bucket": bucket, "Key": key, **({"VersionId": version_id} if version_id else {})}
    with contextlib.suppress(Exception):  # the captured answer has no body; only the URL matters
        client.get_object(**kwargs)
    client.meta.events.unregister("before-send.s3.GetObject", capture)
    return seen[0]


@pytest.mark.parametrize("endpoint_url", [None, "http://127.0.0.1:9000", "http://minio.local:9000/base"])
@pytest.mark.parametrize("bucket", ["my-bucket", "dotted.bucket.name"])
@pytest.mark.parametrize("key", KEYS)
def test_urls_are_the_ones_botocore_sends(endpoint_url, bucket, key):
    lean, botocore_client = lean_client(endpoint_url)
    for version in (None, "3/L4kqtJl+cv=="):
        _, target, headers = lean.sign_get(bucket, key, version)
        scheme = "https" if endpoint_url is None else "http"
        assert f"{scheme}://{headers['host']}{target}" == botocore_url(botocore_client, bucket, key, version)


def test_key_encoding_keeps_only_unreserved_bytes_and_slashes():
    assert encode_key("a b/+%=&?#~ü") == "a%20b/%2B%25%3D%26%3F%23~%C3%BC"
    every = "".join(chr(c) for c in range(1, 128))
    encoded = encode_key(every)
    kept = {c for c in encoded if c != "%" and not c.isalnum()}
    assert kept == {"-", ".", "_", "~", "/"}


# -- against moto ------------------------------------------------------------------------


@pytest.fixture
def fetcher(moto_server, s3_env):
    f = Fetcher(S3Settings(endpoint_url=moto_server.url, max_object_bytes=100_000))
    assert isinstance(f.get_client, LeanS3Client)  # the default
    return f


def source(bucket, key, **kw):
    return Source(kind="s3", uri=f"s3://{bucket}/{key}", bucket=bucket, key=key, **kw)


def code_of(f, src):
    with pytest.raises(ModerationError) as info:
        f.fetch(src)
    return info.value.code


def test_bytes_round_trip_with_etag_and_special_keys(fetcher, s3_client, bucket):
    data = os.urandom(60_000)
    for key in KEYS[:5]:
        put = s3_client.put_object(Bucket=bucket, Key=key, Body=data + key.encode())
        fetched = fetcher.fetch(source(bucket, key))
        assert fetched.data == data + key.encode()
        assert fetched.source.etag == put["ETag"].strip('"') and fetched.source.size == len(fetched.data)


def test_versions_and_response_checksums(fetcher, s3_client, bucket):
    s3_client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    first = s3_client.put_object(Bucket=bucket, Key="v", Body=b"first", ChecksumAlgorithm="SHA256")
    s3_client.put_object(Bucket=bucket, Key="v", Body=b"second", ChecksumAlgorithm="CRC32")
    old = fetcher.fetch(source(bucket, "v", version_id=first["VersionId"]))
    assert old.data == b"first" and old.source.version_id == first["VersionId"]
    latest = fetcher.fetch(source(bucket, "v"))
    assert latest.data == b"second" and latest.source.version_id not in (None, first["VersionId"])


def test_error_codes_match_botocore(fetcher, moto_server, s3_client, bucket):
    s3_client.put_object(Bucket=bucket, Key="big", Body=b"x" * 100_001)
    s3_client.put_object(Bucket=bucket, Key="zero", Body=b"")
    assert code_of(fetcher, source(bucket, "big")) == ErrorCode.TOO_LARGE  # Content-Length
    assert code_of(fetcher, source(bucket, "zero")) == ErrorCode.EMPTY_OBJECT
    assert code_of(fetcher, source(bucket, "missing")) == ErrorCode.NOT_FOUND
    assert code_of(fetcher, source("no-such-bucket-lean", "k")) == ErrorCode.NOT_FOUND
    botocore_fetcher = Fetcher(S3Settings(endpoint_url=moto_server.url, get_client="botocore"))
    for bucket_, key in [(bucket, "missing"), ("no-such-bucket-lean", "k")]:
        errors = []
        for client in (fetcher.get_client, botocore_fetcher.get_client):
            with pytest.raises(Exception) as info:
                client.get_object(Bucket=bucket_, Key=key)
            errors.append(
                (
                    type(info.value).__name__,
                    info.value.response["Error"],
                    info.value.response["ResponseMetadata"],
                )
            )
        (lean_type, lean_error, lean_meta), (boto_type, boto_error, boto_meta) = errors
        assert lean_type == boto_type and lean_error == boto_error
        assert lean_meta["HTTPStatusCode"] == boto_meta["HTTPStatusCode"] == 404


def test_size_cap_counts_bytes_when_content_length_lies(s3_env):
    """A server whose Content-Length is absent: the counted read stops at the cap."""

    def answer(conn):
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 5000)

    with RawServer(answer) as url:
        f = Fetcher(S3Settings(endpoint_url=url, max_object_bytes=1000, max_attempts=1))
        assert code_of(f, source("b", "k")) == ErrorCode.TOO_LARGE


class RawServer:
    """One-shot-per-connection TCP server answering with ``answer(conn)``."""

    def __init__(self, answer):
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.stop = threading.Event()

    def __enter__(self):
        threading.Thread(target=self._serve, daemon=True).start()
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                self.answer(conn)

    def __exit__(self, *exc):
        self.stop.set()
        self.sock.close()


def outcome(f, src):
    """What ``Fetcher._attempt`` makes of one GET: (kind, code, message)."""
    try:
        fetched = f._attempt(src)
    except _Transient as exc:
        return ("transient", None, str(exc))
    except ModerationError as exc:
        return ("permanent", exc.code, exc.message)
    return ("ok", None, fetched.data)


def both(url, **kw):
    return [Fetcher(S3Settings(endpoint_url=url, get_client=c, **kw)) for c in ("lean", "botocore")]


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=503, body=S3_SLOW_DOWN),
        Fault(status=500),
        Fault(status=503, body=b"<html><body>Service Unavailable</body></html>"),
        Fault(status=429, body=b"<Error><Code>TooManyRequests</Code><Message>m</Message></Error>"),
        Fault(status=403, body=b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>"),
        Fault(status=400, body=b"<Error><Code>InvalidObjectState</Code><Message>x</Message></Error>"),
        Fault(status=502, body=b"not xml at all"),
        Fault(reset=True),
    ],
)
def test_faults_are_classified_as_botocore_classifies_them(moto_server, s3_client, bucket, fault):
    s3_client.put_object(Bucket=bucket, Key="k", Body=b"image")
    proxy = FaultProxy(moto_server.url)
    try:
        proxy.rule = lambda m, p: fault
        lean, boto = both(proxy.url)
        assert outcome(lean, source(bucket, "k")) == outcome(boto, source(bucket, "k"))
    finally:
        proxy.stop()


def test_a_stalled_answer_is_a_transient_read_timeout(moto_server, s3_client, bucket):
    s3_client.put_object(Bucket=bucket, Key="k", Body=b"image")
    proxy = FaultProxy(moto_server.url)
    try:
        proxy.rule = lambda m, p: Fault(delay_s=1.0)
        results = [outcome(f, source(bucket, "k")) for f in both(proxy.url, read_timeout_s=0.3)]
        assert results[0][0] == results[1][0] == "transient"
        assert all("ReadTimeoutError" in r[2] for r in results), results
    finally:
        proxy.stop()


def test_a_body_cut_short_is_transient_like_botocore(s3_env):
    def answer(conn):
        conn.recv(65536)
        conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\nETag: "e"\r\n\r\nonly-part')

    with RawServer(answer) as url:
        results = [outcome(f, source("b", "k")) for f in both(url)]
    assert results[0] == results[1]
    assert results[0][0] == "transient" and "IncompleteReadError" in results[0][2]


@pytest.mark.parametrize(
    ("head", "body"),
    [(b"Content-Length: -1\r\n", b"x" * 100), (b"Transfer-Encoding: chunked\r\n", b"-1\r\n" + b"x" * 100)],
)
def test_a_negative_length_is_transient_like_botocore_never_a_read_to_the_end(s3_env, head, body):
    """A negative Content-Length or chunk size is a broken answer, not ``read(-1)`` (every
    byte until the server closes, held in memory) nor an unclassified ValueError."""

    def answer(conn):
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\n" + head + b'ETag: "e"\r\n\r\n' + body)

    with RawServer(answer) as url:
        results = [outcome(f, source("b", "k")) for f in both(url, max_attempts=1)]
    assert results[0][0] == results[1][0] == "transient", results


def test_unreachable_endpoint_is_transient_like_botocore(s3_env):
    from tests.servers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    results = [outcome(f, source("b", "k")) for f in both(url, connect_timeout_s=0.5)]
    assert results[0] == results[1] and results[0][0] == "transient"
    assert "EndpointConnectionError" in results[0][2]


@pytest.mark.parametrize(("checksum", "kind"), [("AAAAAA==", "permanent"), ("6/04xA==", "ok")])
def test_response_checksums_are_verified_like_botocore(s3_env, checksum, kind):
    """S3 sends x-amz-checksum-* when asked (both clients ask); a mismatch fails both."""
    body = b"some image"

    def answer(conn):
        conn.recv(65536)
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nx-amz-checksum-crc32: {checksum}\r\n\r\n"
        conn.sendall(head.encode() + body)

    with RawServer(answer) as url:
        results = [outcome(f, source("b", "k")) for f in both(url)]
    assert results[0] == results[1] and results[0][0] == kind


class KeepAliveServer:
    """HTTP/1.1 server that keeps connections open; counts them. ``/chunked/…`` answers
    with chunked encoding, ``/close/…`` with ``Connection: close``."""

    def __init__(self):
        import http.server

        outer = self
        self.connections = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                outer.connections += 1

            def do_GET(self):
                body = self.path.encode() * 100
                self.send_response(200)
                if "/chunked/" in self.path:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(body), 700):
                        piece = body[i : i + 700]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                self.send_header("Content-Length", str(len(body)))
                if "/close/" in self.path:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def test_connections_are_kept_alive_and_bodies_framed_by_length_chunks_or_close(s3_env):
    server = KeepAliveServer()
    try:
        f = Fetcher(S3Settings(endpoint_url=server.url, max_attempts=1))
        for key in ["a", "b", "chunked/c", "chunked/d", "e"]:
            assert f.fetch(source("bkt", key)).data == f"/bkt/{key}".encode() * 100
        assert server.connections == 1  # one keep-alive connection for all five
        for key in ["close/f", "g", "close/h", "i"]:
            assert f.fetch(source("bkt", key)).data == f"/bkt/{key}".encode() * 100
        assert server.connections == 3  # each "Connection: close" answer cost a new one
    finally:
        server.stop()


def self_signed(tmp_path):
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_https_verifies_against_botocores_ca_bundle(s3_env, tmp_path, monkeypatch):
    import ssl

    cert_path, key_path = self_signed(tmp_path)
    server = KeepAliveServer()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server.server.socket = context.wrap_socket(server.server.socket, server_side=True)
    url = f"https://127.0.0.1:{server.server.server_port}"
    try:
        # Not trusted: both clients refuse the certificate, as a transient SSL error.
        results = [outcome(f, source("bkt", "k")) for f in both(url, max_attempts=1)]
        assert results[0][0] == results[1][0] == "transient"
        assert all("SSLError" in r[2] and "CERTIFICATE_VERIFY_FAILED" in r[2] for r in results), results
        # Trusted through botocore's own setting (AWS_CA_BUNDLE): fetched, on one connection.
        monkeypatch.setenv("AWS_CA_BUNDLE", str(cert_path))
        f = Fetcher(S3Settings(endpoint_url=url, max_attempts=1))
        assert isinstance(f.get_client, LeanS3Client)
        connections = server.connections
        for key in ["a", "b", "c"]:
            assert f.fetch(source("bkt", key)).data == f"/bkt/{key}".encode() * 100
        assert server.connections == connections + 1
    finally:
        server.stop()


def test_a_bucket_in_another_region_is_left_to_botocore(s3_env):
    """S3 answers 301 PermanentRedirect for a bucket of another region; botocore follows
    such redirects, so the lean client hands the bucket to it (its answer is botocore's)."""
    requests = []

    def answer(conn):
        requests.append(conn.recv(65536).split(b"\r\n", 1)[0])
        body = b"<Error><Code>PermanentRedirect</Code><Message>elsewhere</Message></Error>"
        head = f"HTTP/1.1 301 Moved Permanently\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        conn.sendall(head.encode() + b"x-amz-bucket-region: eu-west-1\r\n\r\n" + body)

    with RawServer(answer) as url:
        lean, boto = both(url, max_attempts=1)
        first = outcome(lean, source("bkt", "k"))
        lean_requests = len(requests)
        assert outcome(boto, source("bkt", "k")) == first
        boto_requests = len(requests) - lean_requests
        assert lean_requests == 1 + boto_requests  # its own GET, then botocore's
        requests.clear()
        assert outcome(lean, source("bkt", "k2")) == (first[0], first[1], first[2].replace("/k", "/k2"))
        assert len(requests) == boto_requests  # straight to botocore now


# -- where GETs go: botocore's endpoint, from every source -------------------------------

ENDPOINT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONFIG_FILE",
    "AWS_PROFILE",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
)


def botocore_request(client, bucket, key):
    """(URL, credential scope) of the GET botocore's own client would send."""
    seen = []

    def capture(request, **_):
        auth = request.headers["Authorization"]
        auth = auth.decode() if isinstance(auth, bytes) else auth
        seen.append((request.url, auth.split("Credential=")[1].split(",")[0].split("/", 2)[2]))
        return AWSResponse(request.url, 200, {"Content-Length": "0"}, None)

    client.meta.events.register("before-send.s3.GetObject", capture)
    with contextlib.suppress(Exception):
        client.get_object(Bucket=bucket, Key=key)
    client.meta.events.unregister("before-send.s3.GetObject", capture)
    return seen[0]


def endpoint_source(name, url, tmp_path, monkeypatch):
    """Point the S3 endpoint at ``url`` the way ``name`` says; the setting it leaves."""
    for var in ENDPOINT_ENV:
        monkeypatch.delenv(var, raising=False)
    config = tmp_path / "aws-config"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    config.write_text("[default]\n")
    if name == "setting":
        return url
    if name == "env AWS_ENDPOINT_URL":
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    elif name == "env AWS_ENDPOINT_URL_S3":
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url)
    elif name == "config endpoint_url":
        config.write_text(f"[default]\nendpoint_url = {url}\n")
    elif name == "config services":
        config.write_text(f"[default]\nservices = local\n\n[services local]\ns3 =\n  endpoint_url = {url}\n")
    return None


SOURCES = [
    "setting",
    "env AWS_ENDPOINT_URL",
    "env AWS_ENDPOINT_URL_S3",
    "config endpoint_url",
    "config services",
]


@pytest.mark.parametrize("name", SOURCES)
def test_gets_go_where_botocore_sends_them_for_every_endpoint_source(
    name, moto_server, s3_client, bucket, tmp_path, monkeypatch
):
    """A MinIO/moto endpoint from the setting, the env vars or the AWS config file: the
    lean client GETs from it (path style for this DNS-compatible bucket, as botocore does),
    never ``<bucket>.<endpoint>``."""
    key = "dir/ünï code.jpg"
    s3_client.put_object(Bucket=bucket, Key=key, Body=b"image bytes")
    setting = endpoint_source(name, moto_server.url, tmp_path, monkeypatch)
    lean = Fetcher(S3Settings(endpoint_url=setting, max_attempts=1))
    boto = Fetcher(S3Settings(endpoint_url=setting, max_attempts=1, get_client="botocore"))
    assert isinstance(lean.get_client, LeanS3Client)
    assert lean.fetch(source(bucket, key)).data == b"image bytes" == boto.fetch(source(bucket, key)).data
    endpoint, target, headers = lean.get_client.sign_get(bucket, key)
    scope = headers["authorization"].split("Credential=")[1].split(",")[0].split("/", 2)[2]
    assert (lean.get_client.url(endpoint, target), scope) == botocore_request(boto.get_client, bucket, key)


@pytest.mark.parametrize(
    ("config", "endpoint_url", "region"),
    [
        ("s3 =\n  addressing_style = path\n", None, "eu-west-1"),
        ("s3 =\n  addressing_style = virtual\n", "http://minio.local:9000", "us-east-1"),
        ("s3 =\n  addressing_style = virtual\n", None, "eu-west-1"),
        ("", None, "ap-southeast-2"),
        ("", None, None),
        ("endpoint_url = https://objects.example.com/base\n", None, "eu-central-1"),
    ],
)
@pytest.mark.parametrize("bucket", ["my-bucket", "dotted.bucket.name", "Upper_Case"])
def test_path_style_and_virtual_hosted_urls_and_scopes_are_botocores(
    config, endpoint_url, region, bucket, tmp_path, monkeypatch
):
    for var in (*ENDPOINT_ENV, "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    path = tmp_path / "aws-config"
    path.write_text(f"[default]\n{config}")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(path))
    settings = S3Settings(endpoint_url=endpoint_url, region=region)
    lean = Fetcher(settings).get_client
    assert isinstance(lean, LeanS3Client)
    boto = Fetcher(settings.model_copy(update={"get_client": "botocore"})).get_client
    for key in ["k.jpg", "a/b c/ü.jpg"]:
        endpoint, target, headers = lean.sign_get(bucket, key)
        scope = headers["authorization"].split("Credential=")[1].split(",")[0].split("/", 2)[2]
        assert (lean.url(endpoint, target), scope) == botocore_request(boto, bucket, key)


# -- hostile input and hostile servers -----------------------------------------------------


@pytest.mark.parametrize("bad", ["bad\r\nx-injected: 1\r\nbucket", "bücket", "a b", "a/b", "", "x" * 300])
def test_invalid_bucket_names_are_refused_like_botocore_before_any_request(s3_env, bad):
    requests = []

    def answer(conn):
        requests.append(conn.recv(65536))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nimage")

    with RawServer(answer) as url:
        lean, boto = both(url, max_attempts=1)
        src = Source(kind="s3", uri=f"s3://{bad}/k", bucket=bad, key="k")
        assert outcome(lean, src) == outcome(boto, src)
        assert outcome(lean, src)[:2] == ("permanent", ErrorCode.FETCH_FAILED)
        assert "ParamValidationError" in outcome(lean, src)[2]
    assert requests == []


@pytest.mark.parametrize(
    "key", ["ctl\x01\x1f\x7f.jpg", "tab\there.jpg", "emoji-😀/ключ/鍵.png", "%2F%00.jpg"]
)
def test_keys_with_control_characters_and_any_unicode_round_trip(
    fetcher, moto_server, s3_client, bucket, key
):
    s3_client.put_object(Bucket=bucket, Key=key, Body=b"body of " + key.encode())
    boto = Fetcher(S3Settings(endpoint_url=moto_server.url, get_client="botocore"))
    assert fetcher.fetch(source(bucket, key)).data == b"body of " + key.encode()
    assert boto.fetch(source(bucket, key)).data == b"body of " + key.encode()


def test_a_key_that_is_not_unicode_is_a_fetch_failure_not_a_crash(fetcher, bucket):
    assert code_of(fetcher, source(bucket, "bad-\udcff-surrogate")) == ErrorCode.FETCH_FAILED


def test_an_oversized_error_answer_is_read_up_to_a_cap(s3_env):
    """A 503 that announces 100 MB and sends 1 MB, then nothing: the error is parsed from
    the first 64 KiB (SlowDown: transient) and the connection dropped, instead of buffering
    the body until the read times out (or memory runs out)."""
    closed = threading.Event()

    def answer(conn):
        conn.recv(65536)
        head = b"HTTP/1.1 503 Slow Down\r\nContent-Length: 104857600\r\n\r\n"
        conn.sendall(head + S3_SLOW_DOWN + b" " * (1 << 20))
        conn.settimeout(30)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass
        closed.set()

    with RawServer(answer) as url:
        f = Fetcher(S3Settings(endpoint_url=url, max_attempts=1, read_timeout_s=5))
        kind, _, message = outcome(f, source("bkt", "k"))
        assert kind == "transient" and "SlowDown" in message, message
        assert closed.wait(30)


class ExtraBytesServer:
    """Keep-alive HTTP/1.1 server on a raw socket that answers every GET with its own body
    and then sends more bytes than the body's framing says: a whole forged response whose
    body is ``LEFTOVER``. ``how`` is "same-write" (after the body in one send), "next-write"
    (a second send) or "chunked" (after the last chunk of a chunked body)."""

    FORGED = b'HTTP/1.1 200 OK\r\nContent-Length: 8\r\nETag: "forged"\r\n\r\nLEFTOVER'

    def __init__(self, how):
        self.how = how
        self.connections = 0
        self.sent = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn, contextlib.suppress(OSError):
            fp = conn.makefile("rb")
            while True:
                line = fp.readline()
                if not line:
                    return
                path = line.split(b" ")[1]
                while fp.readline() not in (b"\r\n", b""):
                    pass
                body = b"own body of " + path
                if self.how == "chunked":
                    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    conn.sendall(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) + self.FORGED)
                else:
                    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                    if self.how == "same-write":
                        conn.sendall(head + body + self.FORGED)
                    else:
                        conn.sendall(head + body)
                        conn.sendall(self.FORGED)
                self.sent.set()

    def stop(self):
        self.sock.close()


@pytest.mark.parametrize("how", ["same-write", "next-write", "chunked"])
def test_bytes_past_a_response_never_become_the_next_gets_body(s3_env, how):
    server = ExtraBytesServer(how)
    try:
        f = Fetcher(S3Settings(endpoint_url=server.url, max_attempts=1))
        for key in ["first.jpg", "second.jpg", "third.jpg"]:
            server.sent.clear()
            fetched = f.fetch(source("bkt", key))
            assert fetched.data == f"own body of /bkt/{key}".encode()
            assert fetched.source.etag != "forged"
            server.sent.wait(10)  # every byte of this answer is on its way before the next GET
        assert server.connections == 3  # a connection that had bytes left over is not reused
    finally:
        server.stop()
