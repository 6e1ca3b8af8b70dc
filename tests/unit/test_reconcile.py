"""The outbox reconciler (real Redis): messages that went quiet while the queue is empty
are re-sent; running, queued and fresh ones are left alone."""

import json
import time

import redis

from modgate import keys
from modgate.settings import load_settings
from worker.service.service import Service


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


def celery_message(task_id):
    """A message as kombu's Redis transport stores it in the queue list."""
    return json.dumps({"body": "", "headers": {"id": task_id, "task": "modgate.moderate"}, "properties": {}})


def test_a_backlog_does_not_stop_the_reconciler_and_queued_messages_stay(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    resent: list = []
    svc = service(redis_server, resent)
    put(r, "lost", age_s=2000)  # popped by a killed worker long ago
    put(r, "queued-old", age_s=1000)  # sent before a long backlog, still waiting
    put(r, "queued-new", age_s=800)
    # Producers LPUSH, workers BRPOP: the right end is consumed next.
    r.lpush("modgate", celery_message("queued-old"))
    r.lpush("modgate", celery_message("queued-new"))
    assert svc.reconcile() == ["lost"]
    assert [t for t, _ in resent] == ["lost"]
    # Nothing in the queue that we can place in time: wait for a better round.
    r.delete("modgate")
    r.lpush("modgate", celery_message("sent-by-someone-else"))
    put(r, "lost-2", age_s=2000)
    assert svc.reconcile() == []


def test_the_lock_is_released_only_by_its_holder(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    stolen = []

    def resend(task_id, payload):
        # This round outlived its lock; another worker took it meanwhile.
        r.set(keys.RECONCILE_LOCK, "other-worker", ex=60)
        stolen.append(task_id)

    svc = service(redis_server, [])
    svc._resend = resend
    put(r, "lost", age_s=500)
    r.delete(keys.RECONCILE_LOCK)
    assert svc.reconcile() == ["lost"] and stolen == ["lost"]
    assert r.get(keys.RECONCILE_LOCK) == b"other-worker"
    r.delete(keys.RECONCILE_LOCK)
    svc.reconcile()
    assert r.get(keys.RECONCILE_LOCK) is None  # our own lock is released
