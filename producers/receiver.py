"""``modgate serve-events``: an HTTP receiver for S3-compatible event notifications (a
MinIO or Ceph webhook target, or anything that POSTs S3 ``Records`` JSON).

Answers so that the sender's own retries do the right thing: 202 once the keys are on the
queue, 400 (with the reason) for a body that is not a notification, 401/403 for missing
or wrong credentials, 413 for a body above ``receiver.max_body_bytes``, 503 with
``Retry-After`` while Redis does not accept work. OpenAPI at ``/openapi.json``.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from producers.enqueuer import EVENTS, Enqueuer
from producers.events import MalformedEvent, parse
from worker.settings import Settings
from worker.webhooks import verify

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Modgate-Signature"


class Accepted(BaseModel):
    enqueued: int
    duplicates: int
    refused: int
    ignored: int


class Problem(BaseModel):
    error: str


def _problem(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(settings: Settings, enqueuer: Enqueuer | None = None) -> FastAPI:
    receiver = settings.receiver
    if receiver.token is None and receiver.hmac_secret is None and not receiver.allow_anonymous:
        raise ValueError(
            "the event receiver needs MODGATE_RECEIVER__TOKEN or MODGATE_RECEIVER__HMAC_SECRET "
            "(or MODGATE_RECEIVER__ALLOW_ANONYMOUS=true behind a trusted proxy)"
        )
    enq = enqueuer if enqueuer is not None else Enqueuer(settings)
    app = FastAPI(
        title="modgate event receiver",
        version="1",
        description="S3/MinIO event notifications in; the created objects onto the moderation queue.",
    )

    def authenticate(request: Request, body: bytes) -> JSONResponse | None:
        if receiver.token is not None:
            given = request.headers.get("authorization")
            if not given:
                return _problem(401, "missing Authorization header", {"WWW-Authenticate": "Bearer"})
            token = given[7:] if given.lower().startswith("bearer ") else given
            if not hmac.compare_digest(token.encode(), receiver.token.get_secret_value().encode()):
                return _problem(403, "wrong token")
        if receiver.hmac_secret is not None:
            signature = request.headers.get(SIGNATURE_HEADER)
            if not signature:
                return _problem(401, f"missing {SIGNATURE_HEADER} header")
            if not verify(receiver.hmac_secret.get_secret_value().encode(), body, signature):
                return _problem(403, "bad or expired signature")
        return None

    @app.post(
        "/events",
        status_code=202,
        response_model=Accepted,
        responses={
            400: {"model": Problem},
            401: {"model": Problem},
            403: {"model": Problem},
            413: {"model": Problem},
            503: {"model": Problem},
        },
    )
    async def events(request: Request) -> Any:
        """S3/MinIO notification JSON (``Records``, SNS envelope or EventBridge event)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > receiver.max_body_bytes:
            return _problem(413, f"body above {receiver.max_body_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > receiver.max_body_bytes:  # no or a lying Content-Length
                return _problem(413, f"body above {receiver.max_body_bytes} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        denied = authenticate(request, body)
        if denied is not None:
            return denied
        try:
            parsed = parse(body)
        except MalformedEvent as exc:
            EVENTS.labels("malformed").inc()
            return _problem(400, f"malformed notification: {exc}")
        EVENTS.labels("ignored").inc(len(parsed.ignored))
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
        )

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        """200 while Redis answers, 503 otherwise."""
        try:
            ok = bool(enq.redis.ping())
        except Exception:
            ok = False
        return JSONResponse({"status": "ok" if ok else "redis unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
