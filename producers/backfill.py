"""``modgate enqueue s3://bucket/prefix``: every existing object under a prefix onto the
queue, with filters, a rate limit, resumption and a dry run.

Keys carry the ETag and size from the listing (the worker refuses oversized objects
without downloading them). Routes, not dedup markers, apply here: a backfill is asked
for explicitly, and the worker's idempotent publishing already skips objects judged
under the same policy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from modgate.contract import Item
from modgate.settings import ProducerRoute
from producers.enqueuer import Enqueuer
from producers.events import InvalidRecord, ObjectEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Filters:
    suffixes: tuple[str, ...] = ()  # case-insensitive, e.g. (".jpg", ".png")
    min_size: int | None = None
    max_size: int | None = None
    modified_since: datetime | None = None

    def accept(self, obj: dict[str, Any]) -> bool:
        key, size = obj["Key"], obj.get("Size", 0)
        if key.endswith("/"):
            return False  # "folder" placeholders
        if self.suffixes and not key.lower().endswith(self.suffixes):
            return False
        if self.min_size is not None and size < self.min_size:
            return False
        if self.max_size is not None and size > self.max_size:
            return False
        return not (self.modified_since is not None and obj["LastModified"] < self.modified_since)


@dataclass
class BackfillResult:
    listed: int = 0
    matched: int = 0
    invalid: int = 0  # keys the queue refuses (over 1024 characters): logged, skipped
    enqueued: int = 0
    messages: int = 0
    last_key: str | None = None
    seconds: float = 0.0


def list_objects(client: Any, bucket: str, prefix: str, start_after: str | None) -> Iterator[dict[str, Any]]:
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if start_after:
        kwargs["StartAfter"] = start_after
    for page in client.get_paginator("list_objects_v2").paginate(**kwargs):
        yield from page.get("Contents", [])


class BackfillStopped(Exception):
    """Listing or enqueueing failed part-way; ``result.last_key`` is where to resume."""

    def __init__(self, result: BackfillResult, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.result = result


class RateLimiter:
    """At most ``rate`` keys per second, on average, from the first key on."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.count = 0

    def take(self, n: int) -> None:
        self.count += n
        if self.rate:
            ahead = self.count / self.rate - (time.monotonic() - self.start)
            if ahead > 0:
                time.sleep(ahead)


def backfill(
    enqueuer: Enqueuer | None,
    client: Any,
    bucket: str,
    prefix: str = "",
    filters: Filters = Filters(),
    start_after: str | None = None,
    rate: float | None = None,
    route: ProducerRoute | None = None,
    dry_run: bool = False,
    progress: Callable[[BackfillResult], None] | None = None,
    batch_size: int = 64,
) -> BackfillResult:
    """List, filter and enqueue; ``route`` overrides the configured routes for every key."""
    result = BackfillResult()
    limiter = RateLimiter(rate)
    started = time.perf_counter()
    pending: list[tuple[ProducerRoute | None, Item]] = []

    def flush() -> None:
        # Every group is flushed together, so all keys up to last_key are on the queue and
        # --start-after last_key resumes without a gap.
        if not pending:
            return
        limiter.take(len(pending))
        groups: dict[tuple[str | None, str | None, str | None], list[Item]] = {}
        chosen: dict[tuple[str | None, str | None, str | None], ProducerRoute | None] = {}
        for r, item in pending:
            group = (r.tenant, r.callback_url, r.policy) if r else (None, None, None)
            groups.setdefault(group, []).append(item)
            chosen[group] = r
        if not dry_run and enqueuer is not None:
            for group, items in groups.items():
                result.messages += enqueuer.send(items, chosen[group])
        result.enqueued += len(pending)
        result.last_key = pending[-1][1].key
        pending.clear()
        if progress is not None:
            progress(result)

    try:
        for obj in list_objects(client, bucket, prefix, start_after):
            result.listed += 1
            if not filters.accept(obj):
                continue
            result.matched += 1
            r = route
            if r is None and enqueuer is not None:
                r = enqueuer.producer.route(bucket, obj["Key"])
            etag = obj.get("ETag", "").strip('"') or None
            try:
                item = ObjectEvent(bucket, obj["Key"], etag=etag, size=obj.get("Size")).to_item()
            except InvalidRecord as exc:
                result.invalid += 1
                log.warning("key %r skipped: %s", obj["Key"], exc)
                continue
            pending.append((r, item))
            if len(pending) >= batch_size:
                flush()
        flush()
    except Exception as exc:
        result.seconds = time.perf_counter() - started
        raise BackfillStopped(result, exc) from exc
    result.seconds = time.perf_counter() - started
    return result
