"""A lean S3 GetObject client for the fetch hot path: SigV4 signing with ``hmac``/
``hashlib`` and a minimal HTTP/1.1 client on pooled keep-alive sockets, no botocore
request pipeline. botocore spends ~3 core-ms of Python per GET here (event hooks,
serialisation, urllib3 and http.client's email-based header parsing); this path costs a
fraction (bench/bench_s3_get.py). urllib3 alone cost ~1 core-ms a GET, so it is not used.

It answers ``get_object(Bucket=, Key=, VersionId=)`` in the shape ``Fetcher._get_once``
reads of botocore (``Body`` with ``iter_chunks``/``close``, ``ETag``, ``ContentLength``,
``VersionId``) and fails with the exceptions botocore raises for the same answer
(``ClientError`` parsed from S3's XML error body, ``EndpointConnectionError``,
``ReadTimeoutError``, ``IncompleteReadError``...), so ``fetch.py``'s classification and
retry pacing see no difference.

Where to send a bucket's GETs is botocore's answer, not ours: the first GET of a bucket
runs the wrapped client's own request pipeline up to the point of sending (endpoint
setting, ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, config-file endpoints, path or
virtual-hosted addressing, bucket-name validation, signing region) and keeps the URL and
credential scope it built. What it does not do itself it hands to that botocore client:
buckets in another region (S3 redirects; botocore follows them), buckets whose requests
botocore signs otherwise (SigV4a, S3 Express sessions), and setups it does not model
(proxies, client certificates, FIPS/dual-stack/accelerate endpoints): ``lean_unsupported``
names those, and the ``Fetcher`` then keeps botocore.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import os
import re
import select
import socket
import ssl
import threading
import time
import zlib
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree

from botocore.exceptions import (
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)

from modgate.settings import S3Settings

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_ALGORITHM = "AWS4-HMAC-SHA256"
# The credential scope of botocore's Authorization header: region and service it signs for.
_SCOPE = re.compile(r"^AWS4-HMAC-SHA256 Credential=[^/]*/\d{8}/([^/]+)/([^/]+)/aws4_request,")
_PROBE_KEY = "k"  # the key of the request botocore builds for a bucket but never sends
_MAX_BUCKETS = 1024  # resolved buckets kept; past it the cache starts over
# An error answer larger than this is not S3's XML: parsed from its start, connection dropped.
_MAX_ERROR_BODY = 64 * 1024
# Answers that mean "this bucket lives in another region": botocore re-signs and follows.
_REDIRECT_STATUS = {301, 307}
_REDIRECT_CODES = {"AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "PermanentRedirect"}
# Response checksums botocore validates without awscrt, in its priority order.
_CHECKSUMS = ("crc32", "sha1", "sha256", "sha512")
_PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")


def encode_key(key: str) -> str:
    """S3's canonical URI for a key: UTF-8, every byte but ``A-Za-z0-9-._~`` and ``/``
    percent-encoded (S3 does not normalise or double-encode, unlike other services)."""
    try:
        return quote(key, safe="/~")
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8, so no S3 key
        raise ParamValidationError(report=f"Key {key!r} is not valid Unicode") from None


class SigV4Signer:
    """AWS Signature Version 4 for header-signed requests; the derived signing key is
    cached per secret/date/region/service (one HMAC chain a day instead of per request)."""

    def __init__(self, region: str, service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._keys: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()

    def signing_key(self, secret_key: str, datestamp: str) -> bytes:
        cache_key = (secret_key, datestamp)
        key = self._keys.get(cache_key)
        if key is None:
            key = hmac.new(f"AWS4{secret_key}".encode(), datestamp.encode(), hashlib.sha256).digest()
            for part in (self.region, self.service, "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            with self._lock:
                if len(self._keys) > 8:  # rotated credentials or a new day: drop the old
                    self._keys.clear()
                self._keys[cache_key] = key
        return key

    def authorization(
        self,
        access_key: str,
        secret_key: str,
        method: str,
        canonical_uri: str,
        canonical_query: str,
        headers: dict[str, str],
        payload_hash: str,
        amz_date: str,
    ) -> str:
        """The ``Authorization`` value; ``headers`` (lower-case names) are all signed."""
        names = sorted(headers)
        canonical_headers = "".join(f"{n}:{' '.join(headers[n].split())}\n" for n in names)
        signed = ";".join(names)
        canonical = (
            f"{method}\n{canonical_uri}\n{canonical_query}\n{canonical_headers}\n{signed}\n{payload_hash}"
        )
        datestamp = amz_date[:8]
        scope = f"{datestamp}/{self.region}/{self.service}/aws4_request"
        to_sign = f"{_ALGORITHM}\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(
            self.signing_key(secret_key, datestamp), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        return f"{_ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"


def lean_unsupported(client: Any) -> str | None:
    """Why the lean client cannot stand in for botocore ``client``'s GETs (None: it can)."""
    config = client.meta.config
    s3 = config.s3 or {}
    if config.proxies or any(os.environ.get(v) for v in _PROXY_ENV):
        return "an HTTP proxy is configured"
    if config.use_fips_endpoint or config.use_dualstack_endpoint:
        return "FIPS or dual-stack endpoints are configured"
    if s3.get("use_accelerate_endpoint") or s3.get("use_dualstack_endpoint"):
        return "S3 accelerate or dual-stack endpoints are configured"
    if config.signature_version not in (None, "s3v4", "v4"):
        return f"signature version {config.signature_version!r} is configured"
    if config.client_cert:
        return "a TLS client certificate is configured"
    return None


class _Endpoint(NamedTuple):
    """Where and how one bucket's GETs go, as botocore built its request."""

    tls: bool
    host: str  # to connect to
    port: int
    host_header: str  # signed; the port only when not the scheme's default
    prefix: str  # the path before the key: "/bucket" (path style), "" (virtual-hosted)
    signer: SigV4Signer


class _Probed(Exception):
    """Raised in botocore's ``before-send`` to stop a probe request; carries it."""

    def __init__(self, request: Any) -> None:
        super().__init__("probe")
        self.request = request


class LeanS3Client:
    """GetObject only. ``botocore_client`` is the one-attempt GET client it stands in for:
    its endpoint resolution and signing scope are used per bucket (``meta`` is its), and it
    answers the requests this client does not model (see the module docstring)."""

    def __init__(
        self, botocore_client: Any, credentials: Any, settings: S3Settings, ca_bundle: str | None = None
    ):
        from botocore.httpsession import get_cert_path

        self.meta = botocore_client.meta
        self._fallback = botocore_client
        self._credentials = credentials
        # bucket → its endpoint, or None: botocore's (a region redirect, another signer)
        self._endpoints: dict[str, _Endpoint | None] = {}
        self._lock = threading.Lock()
        self._probing = threading.local()
        botocore_client.meta.events.register_first("before-send.s3.GetObject", self._stop_probe)
        self._http = _Connections(settings, get_cert_path(ca_bundle or True))

    def _stop_probe(self, request: Any, **_: Any) -> None:
        if getattr(self._probing, "active", False):
            raise _Probed(request)

    def _endpoint(self, bucket: str) -> _Endpoint | None:
        """botocore's endpoint for ``bucket``: its client builds and signs a GET (and
        validates the bucket name, raising ``ParamValidationError`` as it would) but does
        not send it; the URL and credential scope are kept. None: botocore sends them."""
        try:
            return self._endpoints[bucket]
        except KeyError:
            pass
        self._probing.active = True
        try:
            self._fallback.get_object(Bucket=bucket, Key=_PROBE_KEY)
            endpoint = None  # sent after all (nothing stopped it): botocore's to handle
        except _Probed as probe:
            endpoint = _endpoint_of(probe.request)
        finally:
            self._probing.active = False
        with self._lock:
            if len(self._endpoints) >= _MAX_BUCKETS:
                self._endpoints.clear()
            self._endpoints[bucket] = endpoint
        return endpoint

    def sign_get(
        self, bucket: str, key: str, version_id: str | None = None, amz_date: str | None = None
    ) -> tuple[_Endpoint | None, str, dict[str, str]]:
        """(endpoint, request target, signed headers) of one GET; endpoint None: botocore's."""
        if self._credentials is None:
            raise NoCredentialsError()
        uri = encode_key(key)
        endpoint = self._endpoint(bucket)
        if endpoint is None:
            return None, "", {}
        creds = self._credentials.get_frozen_credentials()  # refreshes IRSA/instance roles
        uri = f"{endpoint.prefix}/{uri}"
        query = f"versionId={encode_key(version_id).replace('/', '%2F')}" if version_id else ""
        amz_date = amz_date or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        headers = {
            "host": endpoint.host_header,
            "x-amz-checksum-mode": "ENABLED",  # as botocore: S3 sends checksums to verify
            "x-amz-content-sha256": UNSIGNED_PAYLOAD,
            "x-amz-date": amz_date,
        }
        if creds.token:
            headers["x-amz-security-token"] = creds.token
        headers["authorization"] = endpoint.signer.authorization(
            creds.access_key, creds.secret_key, "GET", uri, query, headers, UNSIGNED_PAYLOAD, amz_date
        )
        return endpoint, f"{uri}?{query}" if query else uri, headers

    def url(self, endpoint: _Endpoint, target: str) -> str:
        return f"{'https' if endpoint.tls else 'http'}://{endpoint.host_header}{target}"

    def get_object(self, Bucket: str, Key: str, VersionId: str | None = None) -> dict[str, Any]:
        """One GET, no retries: botocore's ``get_object`` answer or exception."""
        endpoint, target, headers = self.sign_get(Bucket, Key, VersionId)
        if endpoint is None:
            return self._get_via_botocore(Bucket, Key, VersionId)
        url = self.url(endpoint, target)
        request = "".join(
            [f"GET {target} HTTP/1.1\r\n", *(f"{k}: {v}\r\n" for k, v in headers.items()), _FIXED_HEADERS]
        ).encode("ascii")
        response = self._http.request(endpoint, request, url)
        if response.status >= 300:
            self._raise_error(response, url, Bucket)
            return self._get_via_botocore(Bucket, Key, VersionId)  # a region redirect
        h = response.headers
        length = response.length
        out: dict[str, Any] = {
            "Body": _Body(response, length, _checksum_of(h)),
            "ResponseMetadata": _metadata(response.status, h),
        }
        if length is not None:
            out["ContentLength"] = length
        for header, field in (("etag", "ETag"), ("x-amz-version-id", "VersionId")):
            if header in h:
                out[field] = h[header]
        return out

    def _get_via_botocore(self, bucket: str, key: str, version_id: str | None) -> dict[str, Any]:
        kwargs = {"Bucket": bucket, "Key": key}
        if version_id:
            kwargs["VersionId"] = version_id
        return self._fallback.get_object(**kwargs)

    def _raise_error(self, response: Any, url: str, bucket: str) -> None:
        """Raise the ``ClientError`` botocore would, or return for a region redirect
        (the bucket is then the botocore client's from now on)."""
        try:
            body = response.read_capped(_MAX_ERROR_BODY)
        except (OSError, _BrokenResponse) as exc:
            response.close()
            raise _send_error(exc, url) from exc
        parsed = _parse_error(response.status, body, response.headers)
        code = parsed["Error"].get("Code", "")
        if response.status in _REDIRECT_STATUS or (response.status == 400 and code in _REDIRECT_CODES):
            with self._lock:
                self._endpoints[bucket] = None
            return
        # The modelled subclass botocore raises (NoSuchKey, InvalidObjectState...).
        raise self._fallback.exceptions.from_code(code)(parsed, "GetObject")


def _endpoint_of(request: Any) -> _Endpoint | None:
    """The endpoint of a GET botocore built for key ``_PROBE_KEY``; None when this client
    would not send it the same way (another signature, a session token per bucket...)."""
    parts = urlsplit(request.url)
    authorization = request.headers.get("Authorization", b"")
    if isinstance(authorization, bytes):
        authorization = authorization.decode("latin-1")
    match = _SCOPE.match(authorization)
    if (
        match is None
        or parts.query
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or not parts.path.endswith(f"/{_PROBE_KEY}")
        or "x-amz-s3session-token" in {name.lower() for name in request.headers}
    ):
        return None
    tls = parts.scheme == "https"
    default = 443 if tls else 80
    port = parts.port or default
    name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return _Endpoint(
        tls=tls,
        host=parts.hostname,
        port=port,
        host_header=name if port == default else f"{name}:{port}",
        prefix=parts.path[: -len(_PROBE_KEY) - 1],
        signer=SigV4Signer(match.group(1), match.group(2)),
    )


def _send_error(exc: BaseException, url: str) -> Exception:
    """The botocore exception for a failed request, as ``URLLib3Session.send`` maps
    urllib3's (which maps the socket's): the same class, so the same classification."""
    if isinstance(exc, ssl.SSLError):
        return SSLError(endpoint_url=url, error=exc)
    if isinstance(exc, _ConnectFailed):
        cause = exc.__cause__
        if isinstance(cause, TimeoutError):
            return ConnectTimeoutError(endpoint_url=url, error=cause)
        return EndpointConnectionError(endpoint_url=url, error=cause)
    if isinstance(exc, TimeoutError):
        return ReadTimeoutError(endpoint_url=url, error=exc)
    if isinstance(exc, (OSError, _BrokenResponse)):
        return ConnectionClosedError(error=exc, endpoint_url=url)
    return HTTPClientError(error=exc)


def _metadata(status: int, headers: dict[str, str]) -> dict[str, Any]:
    return {
        "RequestId": headers.get("x-amz-request-id", ""),
        "HostId": headers.get("x-amz-id-2", ""),
        "HTTPStatusCode": status,
        "HTTPHeaders": headers,
        "RetryAttempts": 0,
    }


def _parse_error(status: int, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """botocore's RestXMLParser for an S3 error: ``<Error><Code>…`` from the body, or
    the status code and its reason when the body is empty, HTML or not XML."""
    error: dict[str, str] | None = None
    stripped = body.strip()
    if stripped and not (status >= 500 and stripped.startswith(b"<html>")):
        try:
            root = ElementTree.fromstring(stripped)
        except ElementTree.ParseError:
            root = None
        if root is not None:
            node = root if _local(root.tag) == "Error" else root.find(".//{*}Error")
            error = {"Code": "", "Message": ""}
            for child in node if node is not None else ():
                if _local(child.tag) not in ("RequestId", "HostId"):  # in ResponseMetadata
                    error[_local(child.tag)] = child.text or ""
    if error is None:
        error = {"Code": str(status), "Message": http.client.responses.get(status, "")}
    return {"Error": error, "ResponseMetadata": _metadata(status, headers)}


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _checksum_of(headers: Any) -> tuple[str, Any, str] | None:
    """(algorithm, hasher, expected base64) for the first full-object checksum S3 sent
    that botocore would verify; composite (multipart, ``-N``) checksums are skipped."""
    for name in _CHECKSUMS:
        value = headers.get(f"x-amz-checksum-{name}")
        if value and "-" not in value:
            return name, (_Crc32() if name == "crc32" else hashlib.new(name)), value
    return None


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


class _Body:
    """botocore's ``StreamingBody`` as ``_get_once`` uses it: chunks, the Content-Length
    verified at the end (``IncompleteReadError``), read errors as botocore's, and the
    response checksum verified like botocore's ``StreamingChecksumBody``."""

    def __init__(self, response: Any, length: int | None, checksum: tuple[str, Any, str] | None) -> None:
        self._response = response
        self._length = length
        self._read = 0
        self._checksum = checksum

    def read(self, amt: int | None = None) -> bytes:
        try:
            chunk = self._response.read(amt)
        except TimeoutError as exc:
            self._response.close()
            raise ReadTimeoutError(endpoint_url=None, error=exc) from exc  # as botocore's
        except (OSError, _BrokenResponse) as exc:
            self._response.close()
            raise ResponseStreamingError(error=exc) from exc
        self._read += len(chunk)
        if self._checksum is not None:
            self._checksum[1].update(chunk)
        if amt is None or (not chunk and amt > 0):
            if self._length is not None and self._read != self._length:
                raise IncompleteReadError(actual_bytes=self._read, expected_bytes=self._length)
            if self._checksum is not None:
                _, hasher, expected = self._checksum
                actual = base64.b64encode(hasher.digest()).decode()
                if actual != expected:
                    raise FlexibleChecksumError(
                        error_msg=f"Expected checksum {expected} did not match calculated checksum: {actual}"
                    )
        return chunk

    def iter_chunks(self, chunk_size: int = 1024) -> Any:
        while True:
            chunk = self.read(chunk_size)
            if chunk == b"":
                break
            yield chunk

    def close(self) -> None:
        self._response.close()  # a body read to the end has gone back to the pool already


# -- HTTP/1.1 --------------------------------------------------------------------------

# Unsigned, after the signed ones: what http.client adds for botocore, and who is asking.
_FIXED_HEADERS = "accept-encoding: identity\r\nuser-agent: modgate-lean-s3\r\n\r\n"
_MAX_LINE = 65536
_MAX_HEADERS = 100


class _ConnectFailed(Exception):
    """TCP or TLS connect failed; ``__cause__`` is the socket's error."""


class _BrokenResponse(Exception):
    """The server closed the connection early or did not answer in HTTP/1.x."""


def _close(sock: socket.socket, fp: Any) -> None:
    fp.close()
    sock.close()


def _dropped(sock: socket.socket) -> bool:
    """An idle keep-alive socket with something to read has been closed by the server
    (or is out of step): not to be reused. urllib3 checks the same before reuse."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _leftover(sock: socket.socket, fp: Any) -> bool:
    """Bytes past the end of a response, read into ``fp``'s buffer with its last bytes or
    waiting on the socket: a server out of step. Reusing the connection would hand them
    to the next request as its answer (another key's body), so it is not reused."""
    timeout = sock.gettimeout()
    try:
        sock.setblocking(False)
        return bool(fp.peek(1))  # the buffer, else one non-blocking read
    except ssl.SSLWantReadError:
        return False  # TLS: nothing decrypted is waiting
    except (OSError, ValueError):
        return True  # cannot tell: do not reuse
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(timeout)


class _Connections:
    """Keep-alive sockets per (host, port, TLS): at most ``max_concurrency`` idle per
    host; a request takes one (or connects), its response gives it back once read to the
    end with nothing after it."""

    def __init__(self, settings: S3Settings, cafile: str | None) -> None:
        self._connect_timeout = settings.connect_timeout_s
        self._read_timeout = settings.read_timeout_s
        self._maxsize = settings.max_concurrency
        self._cafile = cafile
        self._context: ssl.SSLContext | None = None  # made at the first https endpoint
        self._idle: dict[tuple[str, int, bool], list[tuple[socket.socket, Any]]] = {}
        self._lock = threading.Lock()

    def request(self, endpoint: Any, request: bytes, url: str) -> _Response:
        """Send ``request``; the response with its status line and headers read."""
        where = (endpoint.host, endpoint.port, endpoint.tls)
        conn = self._take(where)
        try:
            if conn is None:
                conn = self._connect(*where)
            sock, fp = conn
            sock.sendall(request)
            return _Response(self, where, sock, fp)
        except (OSError, _ConnectFailed, _BrokenResponse) as exc:
            if conn is not None:
                _close(*conn)
            raise _send_error(exc, url) from exc
        except BaseException:
            if conn is not None:
                _close(*conn)
            raise

    def put(self, where: tuple[str, int, bool], sock: socket.socket, fp: Any) -> None:
        if not _leftover(sock, fp):
            with self._lock:
                idle = self._idle.setdefault(where, [])
                if len(idle) < self._maxsize:
                    idle.append((sock, fp))
                    return
        _close(sock, fp)

    def _take(self, where: tuple[str, int, bool]) -> tuple[socket.socket, Any] | None:
        while True:
            with self._lock:
                idle = self._idle.get(where)
                if not idle:
                    return None
                sock, fp = idle.pop()
            if not _dropped(sock):
                return sock, fp
            _close(sock, fp)

    def _tls(self) -> ssl.SSLContext:
        with self._lock:
            if self._context is None:
                self._context = ssl.create_default_context(cafile=self._cafile)
            return self._context

    def _connect(self, host: str, port: int, tls: bool) -> tuple[socket.socket, Any]:
        try:
            sock = socket.create_connection((host, port), timeout=self._connect_timeout)
        except OSError as exc:
            raise _ConnectFailed() from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as urllib3
            if tls:
                sock = self._tls().wrap_socket(sock, server_hostname=host)
        except ssl.SSLError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise _ConnectFailed() from exc
        sock.settimeout(self._read_timeout)
        return sock, sock.makefile("rb")


class _Response:
    """One HTTP/1.1 response: status and headers (names lower-case) read on creation;
    the body framed by Content-Length, chunked encoding or the end of the connection."""

    def __init__(
        self, pool: _Connections, where: tuple[str, int, bool], sock: socket.socket, fp: Any
    ) -> None:
        self._pool, self._where, self._sock, self._fp = pool, where, sock, fp
        while True:
            line = fp.readline(_MAX_LINE + 1)
            if not line:
                raise _BrokenResponse("Remote end closed connection without response")
            version, _, rest = line.decode("latin-1").partition(" ")
            if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
                raise _BrokenResponse(f"bad status line {line[:100]!r}")
            self.status = int(rest[:3])
            self.headers = self._read_headers()
            if self.status >= 200:
                break  # 1xx (100 Continue): the real answer follows
        h = self.headers
        self._chunked = "chunked" in h.get("transfer-encoding", "").lower()
        self._chunk_left = 0
        self.length: int | None = None
        if not self._chunked and "content-length" in h:
            try:
                self.length = int(h["content-length"])
                if self.length < 0:  # read(-1) would read to the end of the connection
                    raise ValueError
            except ValueError:
                raise _BrokenResponse(f"bad Content-Length {h['content-length']!r}") from None
        self._remaining = 0 if self.status in (204, 304) else self.length  # None: until close
        framed = self._chunked or self._remaining is not None
        self._keep = version == "HTTP/1.1" and framed and "close" not in h.get("connection", "").lower()
        self._done = False
        if self._remaining == 0 and not self._chunked:
            self._finish(True)

    def _read_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(_MAX_HEADERS + 1):
            line = self._fp.readline(_MAX_LINE + 1)
            if line in (b"\r\n", b"\n", b""):
                return headers
            if len(line) > _MAX_LINE:
                raise _BrokenResponse("header line too long")
            name, sep, value = line.decode("latin-1").partition(":")
            if sep:
                name, value = name.strip().lower(), value.strip()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
        raise _BrokenResponse(f"more than {_MAX_HEADERS} headers")

    def read(self, amt: int | None = None) -> bytes:
        """Up to ``amt`` bytes of the body (all with None); b"" at its end."""
        if self._done:
            return b""
        if amt is None:
            return self.read_all()
        if self._chunked:
            return self._read_chunk(amt)
        if self._remaining is None:  # until the server closes
            data = self._fp.read(amt)
            if not data:
                self._finish(False)
            return data
        data = self._fp.read(min(amt, self._remaining))
        self._remaining -= len(data)
        if not self._remaining:
            self._finish(True)
        elif not data:  # closed before Content-Length bytes: the caller counts them
            self._finish(False)
        return data

    def _read_chunk(self, amt: int) -> bytes:
        if not self._chunk_left:
            line = self._fp.readline(_MAX_LINE + 1)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size < 0:
                    raise ValueError
            except ValueError:
                raise _BrokenResponse(f"bad chunk size line {line[:100]!r}") from None
            if size == 0:
                while self._fp.readline(_MAX_LINE + 1) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self._finish(True)
                return b""
            self._chunk_left = size
        data = self._fp.read(min(amt, self._chunk_left))
        if not data:
            raise _BrokenResponse("connection closed inside a chunk")
        self._chunk_left -= len(data)
        if not self._chunk_left and self._fp.read(2) != b"\r\n":
            raise _BrokenResponse("no CRLF after a chunk")
        return data

    def read_all(self) -> bytes:
        chunks = []
        while chunk := self.read(1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    def read_capped(self, cap: int) -> bytes:
        """At most ``cap`` bytes of the body; a longer one is cut off and its connection
        dropped, so a server cannot make us buffer an endless answer."""
        chunks, total = [], 0
        while total <= cap and (chunk := self.read(cap + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
        if total > cap:
            self.close()
        return b"".join(chunks)[:cap]

    def _finish(self, reusable: bool) -> None:
        self._done = True
        if reusable and self._keep:
            self._pool.put(self._where, self._sock, self._fp)
        else:
            _close(self._sock, self._fp)

    def close(self) -> None:
        """Stop reading: a connection with body left unread is not reused."""
        if not self._done:
            self._done = True
            _close(self._sock, self._fp)
