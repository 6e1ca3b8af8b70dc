"""Puts keys on the queue: the one place producers send ``modgate.moderate``.

It applies the producer policy shared by every producer: the bucket allowlist, the
tenant/callback/policy route per bucket and prefix, dedup of repeated notifications, and
``worker.max_items`` keys a message. Tasks are sent by name, as JSON, through a Celery
app that knows nothing of the worker's code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from modgate import keys
from modgate.contract import (
    MODERATE_QUEUE,
    MODERATE_TASK,
    Item,
    ModerateMessage,
    chunk_items,
    task_sender_app,
)
from modgate.settings import ProducerRoute, Settings
from producers.events import InvalidRecord, ObjectEvent

log = logging.getLogger(__name__)

EVENTS = Counter(
    "modgate_producer_events_total",
    "Object events seen by producers, by outcome "
    "(enqueued, duplicate, refused, ignored, invalid, malformed, timed_out, shed).",
    ["outcome"],
)
MESSAGES = Counter("modgate_producer_messages_total", "modgate.moderate messages sent.")


@dataclass
class EnqueueResult:
    enqueued: int = 0
    duplicates: int = 0
    refused: int = 0
    invalid: int = 0
    messages: int = 0

    def add(self, other: EnqueueResult) -> None:
        self.enqueued += other.enqueued
        self.duplicates += other.duplicates
        self.refused += other.refused
        self.invalid += other.invalid
        self.messages += other.messages


def celery_producer(redis_url: str) -> Any:
    return task_sender_app(redis_url, "modgate-producer")


class Enqueuer:
    def __init__(self, settings: Settings, app: Any = None, redis: Any = None) -> None:
        import redis as redis_lib

        self.settings = settings
        self.producer = settings.producer
        self.app = app if app is not None else celery_producer(settings.redis.url)
        self.redis = redis if redis is not None else redis_lib.Redis.from_url(settings.redis.url)

    def allowed(self, bucket: str) -> bool:
        return self.producer.buckets is None or bucket in self.producer.buckets

    def send(self, items: list[Item], route: ProducerRoute | None) -> int:
        """Send ``items`` in messages of at most ``worker.max_items``; returns messages sent."""
        sent = 0
        for chunk in chunk_items(items, self.settings.worker.max_items):
            message = ModerateMessage(
                items=chunk,
                tenant=route.tenant if route else None,
                callback_url=route.callback_url if route else None,
                policy=route.policy if route else None,
            )
            payload = message.model_dump(mode="json")
            task_id = str(uuid.uuid4())
            # The outbox entry first: if the send or the message is lost later, the
            # workers' reconciler re-sends it (see modgate.keys.OUTBOX).
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(keys.OUTBOX_PAYLOADS, task_id, json.dumps(payload))
            pipe.zadd(keys.OUTBOX, {task_id: time.time()})
            pipe.execute()
            self.app.send_task(MODERATE_TASK, args=[payload], queue=MODERATE_QUEUE, task_id=task_id)
            sent += 1
        MESSAGES.inc(sent)
        return sent

    def enqueue_events(self, events: Iterable[ObjectEvent]) -> EnqueueResult:
        """Enqueue object events; raises (leaving nothing marked) when Redis does not accept them.

        An event the queue model refuses is counted as invalid and left out, never raised:
        only Redis trouble may raise, so callers can tell "retry later" from "bad input".
        Dedup markers are written only after the send succeeded, so a failed attempt never
        hides an event from its redelivery; a duplicate that slips through is harmless (the
        worker publishes each verdict once)."""
        result = EnqueueResult()
        fresh: list[tuple[ObjectEvent, Item]] = []
        for event in events:
            try:
                item = event.to_item()
            except InvalidRecord as exc:
                result.invalid += 1
                log.warning("object event left out: %s", exc)
                continue
            if not self.allowed(event.bucket):
                result.refused += 1
                log.warning("event for bucket %r refused: not in producer.buckets", event.bucket)
                continue
            fresh.append((event, item))
        markers = [
            keys.event_marker(hashlib.sha256(e.fingerprint().encode()).hexdigest()[:32]) for e, _ in fresh
        ]
        seen = self.redis.mget(markers) if markers else []
        groups: dict[tuple[str | None, str | None, str | None], list[Item]] = defaultdict(list)
        routes: dict[tuple[str | None, str | None, str | None], ProducerRoute | None] = {}
        todo: list[str] = []
        for (event, item), marker, present in zip(fresh, markers, seen, strict=True):
            if present is not None or marker in todo:
                result.duplicates += 1
                continue
            route = self.producer.route(event.bucket, event.key)
            group = (route.tenant, route.callback_url, route.policy) if route else (None, None, None)
            routes[group] = route
            groups[group].append(item)
            todo.append(marker)
        for group, items in groups.items():
            result.messages += self.send(items, routes[group])
        result.enqueued = len(todo)
        if todo:
            pipe = self.redis.pipeline(transaction=False)
            for marker in todo:
                pipe.set(marker, "1", ex=self.producer.dedup_ttl_s)
            pipe.execute()
        EVENTS.labels("enqueued").inc(result.enqueued)
        EVENTS.labels("duplicate").inc(result.duplicates)
        EVENTS.labels("refused").inc(result.refused)
        EVENTS.labels("invalid").inc(result.invalid)
        return result
