"""Gauges read from Redis at scrape time (worker/observe/metrics.py), against a real
redis-server: queue depth, and the review console's backlog on the results stream,
including verdicts trimmed before the console read them (which never reach review)."""

from __future__ import annotations

import redis
from prometheus_client import CollectorRegistry, generate_latest

from modgate import keys
from worker.observe.metrics import QueueDepthCollector

STREAM = keys.VERDICT_STREAM


def scrape(client: redis.Redis, stream: str | None = STREAM) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(QueueDepthCollector(client, ["modgate"], stream))
    samples = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_the_review_backlog_and_what_was_trimmed_before_the_console_read_it(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.rpush("modgate", "m1", "m2")
    assert scrape(client) == {'modgate_queue_depth{queue="modgate"}': 2.0}  # no stream, no group
    for i in range(10):
        client.xadd(STREAM, {"id": str(i)})
    assert "modgate_review_unread" not in scrape(client)  # no console has ever run
    client.xgroup_create(STREAM, keys.CONSOLE_GROUP, id="0")
    assert (
        scrape(client)["modgate_review_unread"] == 10 and scrape(client)["modgate_review_trimmed_unread"] == 0
    )
    client.xreadgroup(keys.CONSOLE_GROUP, "c", {STREAM: ">"}, count=4)
    assert scrape(client)["modgate_review_unread"] == 6
    # The console is down and the stream is trimmed to its last 3 entries: 3 unread ones are gone.
    client.xtrim(STREAM, maxlen=3, approximate=False)
    samples = scrape(client)
    assert samples["modgate_review_trimmed_unread"] == 3 and samples["modgate_review_unread"] == 3
    client.xreadgroup(keys.CONSOLE_GROUP, "c", {STREAM: ">"})
    samples = scrape(client)
    assert samples["modgate_review_unread"] == 0 and samples["modgate_review_trimmed_unread"] == 0


def test_a_scrape_with_redis_down_has_no_samples_rather_than_failing(redis_server):
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    assert scrape(dead) == {}
