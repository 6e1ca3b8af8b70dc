"""The outbox reconciler (real Redis): messages that went quiet while the queue is empty
are re-sent; running, queued and fresh ones are left alone."""

import json
import time

import redis

from worker import keys
from worker.service import Service
from worker.settings import load_settings


def service(redis_server, resent):
    settings = load_settings(
        redis={"url": redis_server.url},
        worker={"visibility_timeout_s": 60, "message_timeout_s": 10, "metrics_port": 0},
    )
    return Service(
        settings,
        ["modgate"],
        schedule=lambda d, c: None,
        redis=redis.Redis.from_url(redis_server.url),
        resend=lambda task_id, payload: resent.append((task_id, payload)),
    )


def put(r, task_id, age_s):
    r.hset(keys.OUTBOX_PAYLOADS, task_id, json.dumps({"items": [{"bucket": "bkt", "key": task_id}]}))
    r.zadd(keys.OUTBOX, {task_id: time.time() - age_s})


def test_quiet_messages_are_resent_once_the_queue_is_empty(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    resent: list = []
    svc = service(redis_server, resent)
    assert svc.settings.worker.reconcile_after_s == 100
    put(r, "lost", age_s=500)
    put(r, "recent", age_s=5)
    r.lpush("modgate", "a message still waiting")
    assert svc.reconcile() == []  # the lost one might still be in the queue
    r.delete("modgate")
    assert svc.reconcile() == ["lost"]
    assert resent == [("lost", {"items": [{"bucket": "bkt", "key": "lost"}]})]
    assert r.zscore(keys.OUTBOX, "lost") > time.time() - 5  # seen again: not re-sent next round
    assert svc.reconcile() == []
    r.set(keys.RECONCILE_LOCK, "1")
    put(r, "lost-2", age_s=500)
    assert svc.reconcile() == []  # another worker is reconciling
    r.delete(keys.RECONCILE_LOCK)
    assert svc.reconcile() == ["lost-2"]


def test_an_entry_without_payload_is_dropped(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    resent: list = []
    svc = service(redis_server, resent)
    r.zadd(keys.OUTBOX, {"orphan": time.time() - 500})
    assert svc.reconcile() == [] and r.zcard(keys.OUTBOX) == 0 and resent == []
