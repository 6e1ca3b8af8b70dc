"""Prometheus metrics of a worker process (served on ``/metrics`` by ``worker.observe.health``).

Metric objects live at module level, as prometheus_client intends: one registry per process.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

VERDICTS = Counter(
    "modgate_verdicts_total", "Verdicts produced, by decision (error for error verdicts).", ["decision"]
)
ERRORS = Counter("modgate_errors_total", "Error verdicts, by error code.", ["code"])
PUBLISHED = Counter(
    "modgate_published_total", "Stream publications, by result (new or duplicate).", ["result"]
)
MESSAGES = Counter("modgate_messages_total", "Queue messages handled, by outcome.", ["outcome"])
SCORE_CACHE = Counter(
    "modgate_score_cache_total", "Score cache lookups (hit, miss) and entries stored.", ["result"]
)
BATCH_SIZE = Histogram(
    "modgate_batch_size",
    "Frames per detector batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
STAGE_SECONDS = Histogram(
    "modgate_stage_seconds",
    "Per-image latency of each pipeline stage.",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
WEBHOOKS = Counter("modgate_webhook_deliveries_total", "Webhook delivery attempts, by outcome.", ["outcome"])
ACTIONS = Counter(
    "modgate_s3_actions_total", "S3 actions on moderated objects, by action and result.", ["action", "result"]
)


_STAGES = ("fetch_ms", "decode_ms", "prepare_ms", "queue_ms", "infer_ms", "total_ms")


def record_published(verdicts: list[Any], duplicates: list[bool]) -> None:
    """Count one publish round; labels are looked up once per round, not once per verdict."""
    decisions: collections.Counter[str] = collections.Counter()
    codes: collections.Counter[str] = collections.Counter()
    for verdict, duplicate in zip(verdicts, duplicates, strict=True):
        if duplicate:
            continue
        decisions["error" if verdict.error is not None else verdict.decision or "error"] += 1
        if verdict.error is not None:
            codes[verdict.error.code.value] += 1
        for stage in _STAGES:
            if stage in verdict.timings_ms:
                STAGE_SECONDS.labels(stage[:-3]).observe(verdict.timings_ms[stage] / 1000.0)
    new = len(verdicts) - sum(duplicates)
    if new:
        PUBLISHED.labels("new").inc(new)
    if new < len(verdicts):
        PUBLISHED.labels("duplicate").inc(len(verdicts) - new)
    for decision, n in decisions.items():
        VERDICTS.labels(decision).inc(n)
    for code, n in codes.items():
        ERRORS.labels(code).inc(n)


class QueueDepthCollector(Collector):
    """Reads queue lengths from Redis at scrape time (kombu keeps each queue as a list), and
    how far the review console's consumer group is behind the results stream."""

    def __init__(self, redis: Any, queues: list[str], stream: str | None = None) -> None:
        self.redis = redis
        self.queues = queues
        self.stream = stream

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("modgate_queue_depth", "Messages waiting in a queue.", labels=["queue"])
        try:
            for queue in self.queues:
                family.add_metric([queue], float(self.redis.llen(queue)))
            review = review_backlog(self.redis, self.stream) if self.stream else None
        except Exception:  # Redis down: no sample rather than a failed scrape
            return
        yield family
        if review is None:  # no console has ever read the stream (or Redis < 7: no counts)
            return
        unread, trimmed = review
        yield GaugeMetricFamily(
            "modgate_review_unread",
            "Verdicts on the results stream the review console has not read yet.",
            value=float(unread),
        )
        yield GaugeMetricFamily(
            "modgate_review_trimmed_unread",
            "Verdicts trimmed from the results stream before the review console read them "
            "(those needing review never reach its queue).",
            value=float(trimmed),
        )


def review_backlog(redis: Any, stream: str) -> tuple[int, int] | None:
    """(entries the console's group has not read, entries trimmed before it read them), from
    XINFO (Redis ≥ 7 counts entries added and read); None without the group or the counts."""
    from redis.exceptions import ResponseError

    from modgate import keys

    try:
        groups = redis.xinfo_groups(stream)
        info = redis.xinfo_stream(stream)
    except ResponseError:  # no stream yet
        return None
    group = next((g for g in groups if _text(g.get("name")) == keys.CONSOLE_GROUP), None)
    added, length = info.get("entries-added"), info.get("length")
    if group is None or added is None or length is None:
        return None
    read = group.get("entries-read")
    if read is None:
        # Never read: Redis counts nothing read only while the group sits at the start.
        if _text(group.get("last-delivered-id")) not in ("0-0", "0"):
            return None
        read = 0
    trimmed = max(0, int(added) - int(length) - int(read))
    delivered = _stream_id(group.get("last-delivered-id"))
    if int(length) == 0 or delivered >= _stream_id(info.get("last-generated-id")):
        return 0, trimmed
    if delivered < _stream_id((info.get("first-entry") or ["0-0"])[0]):
        return int(length), trimmed
    # Inside the stream: Redis's lag (entries added minus read). It also counts entries lost
    # to trimming at an earlier time, which this gauge then overstates.
    lag = group.get("lag")
    return (int(lag) if lag is not None else max(0, int(added) - int(read))), trimmed


def _stream_id(value: Any) -> tuple[int, int]:
    ms, _, seq = _text(value).partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_collector: QueueDepthCollector | None = None


def watch_queues(redis: Any, queues: list[str], stream: str | None = None) -> None:
    """Export the queues' depth (and, given the results stream, the review console's
    backlog on it) at every scrape."""
    global _collector
    if _collector is not None:
        REGISTRY.unregister(_collector)
    _collector = QueueDepthCollector(redis, queues, stream)
    REGISTRY.register(_collector)
