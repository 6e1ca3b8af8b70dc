"""The webhook envelope: what every delivery carries (event types, headers, the delivery
record itself) and how a delivery is put on the webhook queue.

It lives in the light package because two deployables queue deliveries: the worker
(``verdict.created``, worker/delivery/webhooks.py) and the review console
(``verdict.reviewed``, modgate/review.py). Both queue through ``queue_delivery``, so every
delivery is noted as pending before its task is sent and the dispatcher's reconciler can
re-send one lost in transit. Sending, signing at send time, retries and dead letters stay
with the dispatcher (worker/delivery/webhooks.py); receivers verify with ``modgate.signing``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field, field_validator

from modgate import keys
from modgate.settings import WebhookSettings
from modgate.signing import EVENT_HEADER, SIGNATURE_HEADER, sign, sign_standard

VERDICT_HEADER = "Modgate-Verdict-Id"
EVENT_TYPE_HEADER = "Modgate-Event-Type"
DELIVERY_HEADER = "Modgate-Delivery-Attempt"
VERDICT_CREATED = "verdict.created"
VERDICT_REVIEWED = "verdict.reviewed"
EVENT_TYPES = (VERDICT_CREATED, VERDICT_REVIEWED)
# Nothing is reserved now; kept so that code reading it still imports.
RESERVED_EVENT_TYPES: tuple[str, ...] = ()

# docs/webhooks.md and `modgate schema` describe exactly this.
ENVELOPE: dict[str, Any] = {
    "method": "POST",
    "content_type": "application/json",
    "body": "verdict.created: the verdict JSON exactly as stored in the stream entry's `verdict` field "
    "(this document is its JSON Schema); verdict.reviewed: a ReviewedEvent "
    '({"type": "verdict.reviewed", "review": {...}, "verdict": {...}}; its JSON Schema is '
    "x-modgate-reviewed-event)",
    "event_types": {
        VERDICT_CREATED: "a verdict was added to the results stream",
        VERDICT_REVIEWED: "a reviewer decided a verdict in the review console (safe, or unsafe with a "
        "category); sent to the URLs the verdict's verdict.created events went to",
    },
    "headers": {
        EVENT_HEADER: "verdict.created: <verdict id>:<stream entry id>; verdict.reviewed: "
        "<verdict id>:review:<reviews stream entry id>. One event per entry, the same on every attempt "
        "and copy: deduplicate on it",
        VERDICT_HEADER: "the verdict id (sha256 of object and policy version); several events may share it",
        EVENT_TYPE_HEADER: "the event type: verdict.created or verdict.reviewed",
        DELIVERY_HEADER: "1, 2, ...: the attempt number",
        SIGNATURE_HEADER: "t=<unix>,v1=<hex HMAC-SHA256(secret, '<t>.<body>')>, one v1 per active secret "
        "(Stripe's scheme); absent when no secret is configured",
        "webhook-id": "the event id (Standard Webhooks)",
        "webhook-timestamp": "<unix> (Standard Webhooks)",
        "webhook-signature": "v1,<base64 HMAC-SHA256(key, '<webhook-id>.<timestamp>.<body>')>, "
        "space-separated, one per active secret (Standard Webhooks); "
        "key = base64 after whsec_, or the secret's UTF-8 bytes",
    },
}


def event_id(verdict_id: str, entry_id: str) -> str:
    """A ``verdict.created`` event: one stream entry (``verdict.reviewed`` events name their
    reviews-stream entry: ``modgate.review.review_event_id``)."""
    return f"{verdict_id}:{entry_id}"


def strip_userinfo(url: str) -> str:
    """``url`` without ``user:password@``: credentials are never stored, logged or sent."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


class Delivery(BaseModel):
    """One event on its way to one URL; travels as the webhook task's argument
    (``args=[delivery.model_dump(mode="json")]``)."""

    delivery_id: str
    event_id: str
    # None only in deliveries queued before event ids named the stream entry.
    verdict_id: str | None = None
    event_type: str = VERDICT_CREATED
    url: str
    tenant: str | None = None
    body: str
    # Who started this retry chain: the event for first deliveries, the dead letter for replays.
    chain: str
    attempt: int = Field(1, ge=1)
    hop: int = 0
    first_at: float
    not_before: float = 0.0
    last_error: str | None = None

    @field_validator("url")
    @classmethod
    def _no_userinfo(cls, url: str) -> str:
        return strip_userinfo(url)

    @classmethod
    def new(
        cls,
        event_id: str,
        url: str,
        body: str,
        tenant: str | None,
        *,
        verdict_id: str | None = None,
        event_type: str = VERDICT_CREATED,
        chain: str | None = None,
    ) -> Delivery:
        url = strip_userinfo(url)
        delivery_id = hashlib.sha256(f"{event_id}\x00{url}".encode()).hexdigest()[:32]
        return cls(
            delivery_id=delivery_id,
            event_id=event_id,
            verdict_id=verdict_id,
            event_type=event_type,
            url=url,
            tenant=tenant,
            body=body,
            chain=chain or event_id,
            first_at=time.time(),
        )

    def headers(self, settings: WebhookSettings, now: int) -> dict[str, str]:
        body = self.body.encode()
        headers = {
            EVENT_HEADER: self.event_id,
            VERDICT_HEADER: self.verdict_id or self.event_id.split(":", 1)[0],
            EVENT_TYPE_HEADER: self.event_type,
            DELIVERY_HEADER: str(self.attempt),
            "webhook-id": self.event_id,
            "webhook-timestamp": str(now),
        }
        secrets = [s.get_secret_value() for s in settings.secrets_for(self.tenant)]
        if secrets:
            headers[SIGNATURE_HEADER] = sign(secrets, body, now)
            headers["webhook-signature"] = sign_standard(secrets, self.event_id, body, now)
        return headers


def queue_delivery(
    redis: Any, delivery: Delivery, send_task: Callable[[Delivery], None], *, countdown: float = 0.0
) -> None:
    """Put ``delivery`` on the webhook queue: note it as pending first (``keys.WEBHOOK_PENDING``,
    due ``countdown`` seconds from now, and its payload, in one MULTI), then ``send_task`` it
    (which sends the ``modgate.deliver_webhook`` task). A task lost in transit is re-sent by
    the dispatcher's reconciler; copies are harmless (the dispatcher's done marker and lease)."""
    pipe = redis.pipeline(transaction=True)
    pipe.zadd(keys.WEBHOOK_PENDING, {delivery.delivery_id: time.time() + countdown})
    pipe.hset(keys.WEBHOOK_PENDING_PAYLOADS, delivery.delivery_id, delivery.model_dump_json())
    pipe.execute()
    send_task(delivery)


def celery_sender(app: Any) -> Callable[[Delivery], None]:
    """A ``send_task`` for ``queue_delivery`` from a Celery app (or anything with Celery's
    ``send_task``) connected to the broker: the webhook task on the webhook queue."""
    from modgate.contract import WEBHOOK_QUEUE, WEBHOOK_TASK

    def send(delivery: Delivery) -> None:
        app.send_task(WEBHOOK_TASK, args=[delivery.model_dump(mode="json")], queue=WEBHOOK_QUEUE)

    return send
