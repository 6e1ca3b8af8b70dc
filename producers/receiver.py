"""``modgate serve-events``: an HTTP receiver for S3-compatible event notifications (a
MinIO or Ceph webhook target, or anything that POSTs S3 ``Records`` JSON).

Answers so that the sender's own retries do the right thing: 202 once the valid keys are
on the queue (records that are not valid object events are counted and named in the
answer, never retried), 400 (with the reason) for a body in which nothing is valid,
401/403 for missing or wrong credentials, 408 for a body that does not arrive within
``receiver.body_timeout_s``, 413 for a body above ``receiver.max_body_bytes``, 503 with
``Retry-After`` only while Redis does not accept work or while the bodies being read
already hold ``receiver.max_buffered_bytes``. A connection whose request line and headers
are not complete within ``receiver.header_timeout_s`` is closed (``http_protocol``).

Without a token (HMAC only, or anonymous) no body is vouched for until it has been read
and verified, so a full buffer is shared fairly instead: the body holding the most gives
way (503) to a smaller one, and strangers with made-up signatures cannot crowd out a
signed event.

Unauthenticated clients cost nothing: the bearer token (and the form and age of a
``Modgate-Signature``) are checked from the headers before any body byte is read, and an
early answer closes the connection. ``/openapi.json`` declares the body models and the
security schemes; ``/docs`` and ``/redoc`` only with ``receiver.docs``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from starlette.concurrency import run_in_threadpool
from uvicorn.protocols.http.h11_impl import H11Protocol

from modgate.settings import ReceiverSettings, Settings
from modgate.signing import verify
from producers.enqueuer import EVENTS, Enqueuer
from producers.events import MalformedEvent, Parsed, parse

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Modgate-Signature"
# Invalid records named in one answer or logged one by one; the rest are only counted.
MAX_NAMED = 50
# Same tolerance as modgate.signing.verify, checked before the body is read.
SIGNATURE_TOLERANCE_S = 300
_FIELD = re.compile(r"[a-z0-9]{1,16}=[\x21-\x2b\x2d-\x7e]{1,256}")
BUFFERED = Gauge("modgate_receiver_buffered_bytes", "Request body bytes held by the bodies being read.")


# -- the request body, as documented for the OpenAPI schema (parsing is events.parse) -----


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class S3Bucket(_Open):
    name: str = Field(min_length=3, max_length=255)


class S3Object(_Open):
    key: str = Field(
        min_length=1,
        max_length=3072,
        description="URL-encoded by AWS and MinIO (space as '+'), as stored by Ceph RGW.",
    )
    size: int | None = Field(None, ge=0)
    eTag: str | None = Field(None, max_length=256)
    versionId: str | None = Field(None, max_length=1024)


class S3Entity(_Open):
    bucket: S3Bucket
    object: S3Object


class S3Record(_Open):
    eventName: str = Field(
        description="ObjectCreated:* (AWS) or s3:ObjectCreated:* (MinIO, Ceph) are moderated; "
        "MinIO's PutTagging, DeleteTagging, PutRetention, PutLegalHold and any other event are ignored."
    )
    eventSource: str | None = Field(None, description="aws:s3, minio:s3, ceph:s3, …")
    s3: S3Entity


class S3Notification(_Open):
    """S3 ``Records`` as AWS, MinIO and Ceph RGW send them."""

    Records: list[S3Record]


class SnsEnvelope(_Open):
    """An S3 notification delivered through SNS; ``Message`` is its JSON."""

    Type: Literal["Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"]
    Message: str


class EventBridgeObject(_Open):
    key: str = Field(min_length=1, max_length=1024)
    size: int | None = Field(None, ge=0)
    etag: str | None = Field(None, max_length=256)


class EventBridgeDetail(_Open):
    bucket: S3Bucket
    object: EventBridgeObject


class EventBridgeEvent(_Open):
    """An EventBridge "Object Created" event (others are ignored)."""

    source: str
    detail_type: str = Field(alias="detail-type")
    detail: EventBridgeDetail


NotificationBody = S3Notification | SnsEnvelope | EventBridgeEvent


# -- answers ------------------------------------------------------------------------------


class InvalidRecordOut(BaseModel):
    record: str = Field(description="Where the record is in the body, e.g. Records[3].")
    reason: str


class Accepted(BaseModel):
    enqueued: int
    duplicates: int
    refused: int = Field(description="Events for buckets outside producer.buckets.")
    ignored: int = Field(description="Records that are no upload (test events, deletes, tagging…).")
    invalid: int = Field(0, description="Records that are not valid object events; not retried.")
    invalid_records: list[InvalidRecordOut] = Field(
        default_factory=list, description=f"The first {MAX_NAMED} invalid records and why."
    )


class Problem(BaseModel):
    error: str
    invalid_records: list[InvalidRecordOut] | None = None


def _problem(
    status: int, message: str, headers: dict[str, str] | None = None, close: bool = False, **extra: Any
) -> JSONResponse:
    headers = dict(headers or {})
    if close:
        # The body was not (fully) read: closing is the only way to stop reading it.
        headers["Connection"] = "close"
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _named(parsed: Parsed) -> list[dict[str, str]]:
    return [{"record": r.record, "reason": r.reason} for r in parsed.invalid[:MAX_NAMED]]


class _Body:
    """The chunks of one body being read; ``shed`` lets go of them (from any request)."""

    __slots__ = ("chunks", "held", "was_shed")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.held = 0
        self.was_shed = False

    def add(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.held += len(chunk)

    def shed(self) -> int:
        """Drop the chunks (the memory goes now; the reader answers 503 at its next chunk,
        or 408 at its deadline); returns the bytes let go."""
        held, self.held = self.held, 0
        self.chunks.clear()
        self.was_shed = True
        return held


def _signature_time(header: str) -> int | None:
    """The ``t`` of a well-formed ``t=<unix>,v1=<hex>[,…]`` header, else None (no exception:
    a non-ASCII or garbled header is the sender's error, a 401, never a 500)."""
    if len(header) > 4096 or not header.isascii():
        return None
    fields = header.split(",")
    if not all(_FIELD.fullmatch(f) for f in fields):
        return None
    pairs = [f.split("=", 1) for f in fields]
    times = [v for k, v in pairs if k == "t"]
    if len(times) != 1 or not times[0].isdigit() or len(times[0]) > 12:
        return None
    if not any(k == "v1" and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in pairs):
        return None
    return int(times[0])


def create_app(settings: Settings, enqueuer: Enqueuer | None = None) -> FastAPI:
    receiver = settings.receiver
    if receiver.token is None and receiver.hmac_secret is None and not receiver.allow_anonymous:
        raise ValueError(
            "the event receiver needs MODGATE_RECEIVER__TOKEN or MODGATE_RECEIVER__HMAC_SECRET "
            "(or MODGATE_RECEIVER__ALLOW_ANONYMOUS=true behind a trusted proxy)"
        )
    enq = enqueuer if enqueuer is not None else Enqueuer(settings)
    raw_key_sources = tuple(settings.producer.raw_key_sources)
    app = FastAPI(
        title="modgate event receiver",
        version="1",
        description="S3/MinIO/Ceph event notifications in; the created objects onto the moderation queue.",
        docs_url="/docs" if receiver.docs else None,
        redoc_url="/redoc" if receiver.docs else None,
    )

    def check_headers(request: Request) -> JSONResponse | None:
        """Everything about the credentials that the headers alone can tell."""
        if receiver.token is not None:
            given = request.headers.get("authorization")
            if not given:
                return _problem(401, "missing Authorization header", {"WWW-Authenticate": "Bearer"}, True)
            token = given[7:] if given.lower().startswith("bearer ") else given
            if not hmac.compare_digest(token.encode(), receiver.token.get_secret_value().encode()):
                return _problem(403, "wrong token", close=True)
        if receiver.hmac_secret is not None:
            signature = request.headers.get(SIGNATURE_HEADER)
            if not signature:
                return _problem(401, f"missing {SIGNATURE_HEADER} header", close=True)
            timestamp = _signature_time(signature)
            if timestamp is None:
                return _problem(401, f"malformed {SIGNATURE_HEADER} header", close=True)
            if abs(time.time() - timestamp) > SIGNATURE_TOLERANCE_S:
                return _problem(403, "bad or expired signature", close=True)
        return None

    # Bodies being read and the bytes they hold (one event loop: no lock needed).
    reading: set[_Body] = set()
    buffered = [0]
    # Without a token nothing vouches for a sender until its body's MAC checks out (or
    # ever, when anonymous): strangers with a well-formed made-up signature could hold
    # the whole buffer and every signed event would get 503. So then, when the buffer is
    # full, the unverified body holding the most gives way to a smaller one.
    unverified = receiver.token is None

    def make_room(body: _Body, size: int) -> bool:
        while buffered[0] + size > receiver.max_buffered_bytes:
            if not unverified:
                return False
            victim = max((b for b in reading if b is not body), key=lambda b: b.held, default=None)
            # Only a body that would still hold more than this one: no two bodies take
            # turns shedding each other, and every body of a fair share finds room.
            if victim is None or victim.held <= body.held + size:
                return False
            buffered[0] -= victim.shed()
            EVENTS.labels("shed").inc()
        return True

    async def read_body(request: Request) -> bytes | JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > receiver.max_body_bytes:
            return _problem(413, f"body above {receiver.max_body_bytes} bytes", close=True)
        body = _Body()
        reading.add(body)
        size = 0
        try:
            async with asyncio.timeout(receiver.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > receiver.max_body_bytes:  # no or a lying Content-Length
                        return _problem(413, f"body above {receiver.max_body_bytes} bytes", close=True)
                    if body.was_shed or not make_room(body, len(chunk)):
                        if not body.was_shed:
                            EVENTS.labels("shed").inc()
                        return _problem(503, "too many bodies in flight", {"Retry-After": "5"}, True)
                    buffered[0] += len(chunk)
                    body.add(chunk)
                    BUFFERED.set(buffered[0])
            if body.was_shed:
                return _problem(503, "too many bodies in flight", {"Retry-After": "5"}, True)
            return b"".join(body.chunks)  # joined before ``finally`` lets go of the chunks
        except TimeoutError:
            EVENTS.labels("timed_out").inc()
            return _problem(408, f"body not received within {receiver.body_timeout_s:g} s", close=True)
        finally:
            reading.discard(body)
            buffered[0] -= body.shed()
            BUFFERED.set(buffered[0])

    @app.post(
        "/events",
        status_code=202,
        response_model=Accepted,
        responses={
            400: {"model": Problem, "description": "Not a notification, or no valid record in it."},
            401: {"model": Problem, "description": "Missing or malformed credentials."},
            403: {"model": Problem, "description": "Wrong token or signature."},
            408: {"model": Problem, "description": "The body did not arrive in time."},
            413: {"model": Problem, "description": "Body above receiver.max_body_bytes."},
            503: {
                "model": Problem,
                "description": "Redis does not accept work, or too many bodies are in flight; "
                "retry after Retry-After.",
            },
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "anyOf": [
                                {"$ref": f"#/components/schemas/{m.__name__}"}
                                for m in (S3Notification, SnsEnvelope, EventBridgeEvent)
                            ]
                        }
                    }
                },
            }
        },
    )
    async def events(request: Request) -> Any:
        """S3/MinIO/Ceph notification JSON (``Records``, SNS envelope or EventBridge event)."""
        denied = check_headers(request)
        if denied is not None:
            return denied
        body = await read_body(request)
        if isinstance(body, JSONResponse):
            return body
        if receiver.hmac_secret is not None:
            secret = receiver.hmac_secret.get_secret_value().encode()
            if not verify(secret, body, request.headers[SIGNATURE_HEADER]):
                return _problem(403, "bad or expired signature")
        try:
            # Off the event loop: a 1 MiB body of records takes a while to validate.
            parsed = await run_in_threadpool(parse, body, raw_key_sources)
        except MalformedEvent as exc:
            EVENTS.labels("malformed").inc()
            return _problem(400, f"malformed notification: {exc}")
        EVENTS.labels("ignored").inc(len(parsed.ignored))
        if parsed.invalid:
            EVENTS.labels("invalid").inc(len(parsed.invalid))
            for rejected in parsed.invalid[:MAX_NAMED]:
                log.warning("invalid record %s left out: %s", rejected.record, rejected.reason)
            if not parsed.events and not parsed.ignored:
                return _problem(400, "no valid record in the notification", invalid_records=_named(parsed))
        try:
            result = await run_in_threadpool(enq.enqueue_events, parsed.events)
        except Exception as exc:
            log.error("cannot enqueue: %s", exc)
            return _problem(503, "the queue is unavailable; retry later", {"Retry-After": "5"})
        return Accepted(
            enqueued=result.enqueued,
            duplicates=result.duplicates,
            refused=result.refused,
            ignored=len(parsed.ignored),
            invalid=len(parsed.invalid) + result.invalid,
            invalid_records=_named(parsed),
        )

    @app.get("/healthz", responses={503: {"description": "Redis does not answer."}})
    def healthz() -> JSONResponse:
        """200 while Redis answers, 503 otherwise."""
        try:
            ok = bool(enq.redis.ping())
        except Exception:
            ok = False
        return JSONResponse({"status": "ok" if ok else "redis unavailable"}, status_code=200 if ok else 503)

    if receiver.metrics:
        # Unauthenticated like every Prometheus target: counters only, no body read, and
        # the chart's Ingress routes /events alone, so it is reachable in-cluster only.
        @app.get("/metrics", include_in_schema=False)
        def metrics() -> Response:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {})
            body_schema = TypeAdapter(NotificationBody).json_schema(
                ref_template="#/components/schemas/{model}"
            )
            components.setdefault("schemas", {}).update(body_schema.get("$defs", {}))
            schemes: dict[str, Any] = {}
            if receiver.token is not None:
                schemes["bearerToken"] = {"type": "http", "scheme": "bearer"}
            if receiver.hmac_secret is not None:
                schemes["modgateSignature"] = {
                    "type": "apiKey",
                    "in": "header",
                    "name": SIGNATURE_HEADER,
                    "description": 't=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>',
                }
            if schemes:
                components["securitySchemes"] = schemes
                # All configured schemes are required together (one requirement object).
                schema["paths"]["/events"]["post"]["security"] = [{name: [] for name in schemes}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


# -- the connection: a deadline on request heads -------------------------------------------


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head: from the moment the
    connection can take a request (opened, or the previous response sent) until that
    request's line and headers are complete, else the connection is closed. uvicorn has
    no such limit: a new connection has no timer, and its keep-alive timer stops at the
    first byte of the next request, so a client that never finishes its headers
    (slowloris) would hold the connection forever. The body has its own deadline
    (``read_body``)."""

    header_timeout_s: float = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        headers = self.headers
        super().handle_events()
        if self.headers is not headers:  # a request head was parsed (uvicorn sets them anew)
            self._disarm()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            # Armed before super(): it parses a pipelined request that may already be here.
            self._arm()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        # An idle keep-alive connection closing is routine; a head begun and not finished is not.
        if self.conn.trailing_data[0]:
            EVENTS.labels("timed_out").inc()
            log.info(
                "%s: request headers not received within %g s; closing", self.client, self.header_timeout_s
            )
        self.transport.close()


def http_protocol(settings: ReceiverSettings) -> type[asyncio.Protocol]:
    """The protocol class for ``uvicorn.run(..., http=...)``: h11 with the header deadline."""
    return type(
        "HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": settings.header_timeout_s}
    )
