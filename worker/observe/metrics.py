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
    """Reads queue lengths from Redis at scrape time (kombu keeps each queue as a list)."""

    def __init__(self, redis: Any, queues: list[str]) -> None:
        self.redis = redis
        self.queues = queues

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("modgate_queue_depth", "Messages waiting in a queue.", labels=["queue"])
        try:
            for queue in self.queues:
                family.add_metric([queue], float(self.redis.llen(queue)))
        except Exception:  # Redis down: no sample rather than a failed scrape
            return
        yield family


_collector: QueueDepthCollector | None = None


def watch_queues(redis: Any, queues: list[str]) -> None:
    global _collector
    if _collector is not None:
        REGISTRY.unregister(_collector)
    _collector = QueueDepthCollector(redis, queues)
    REGISTRY.register(_collector)
