"""A worker killed between kombu's BRPOP and its unacked record: the message is then in
neither the queue nor the unacked hash (the visibility timeout cannot bring it back), and
only modgate's outbox still knows it. The kill is made exact by a proxy that lets the
BRPOP reply through and holds every byte the worker sends after it; a fresh worker's
reconciler must then re-send the message: one verdict, one webhook, the outbox empty."""

from __future__ import annotations

import json
import re
import time

from modgate import keys
from modgate.contract import MODERATE_QUEUE, WEBHOOK_QUEUE, Item
from modgate.settings import ProducerRoute, load_settings
from producers.enqueuer import Enqueuer
from tests.faults.redis_cut import RedisCut
from tests.helpers import upload, verdicts, wait_for
from tests.servers import WebhookReceiver

# The reconciler re-sends a message quiet for visibility + message timeout + 30 s, checked
# every visibility / 2 s, so the test's length is set by these: visibility is the least the
# settings accept (message timeout + 30 s), and 3 s is several times what the one message
# takes (~0.4 s on 2 CPU cores) while saving all but ~6 s of the quiet period 1 s would give.
MESSAGE_TIMEOUT_S = 3
VISIBILITY_TIMEOUT_S = MESSAGE_TIMEOUT_S + 30
QUIET_S = VISIBILITY_TIMEOUT_S + MESSAGE_TIMEOUT_S + 30
RECONCILE_EVERY_S = VISIBILITY_TIMEOUT_S / 2
# kombu's Redis transport: the hash of unacknowledged messages and its index by time.
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"


def test_a_worker_killed_between_brpop_and_the_unacked_record_loses_nothing(
    env, r, durable_redis, workers, s3_client, bucket
):
    started = time.monotonic()
    env = {
        **env,
        "MODGATE_WORKER__MESSAGE_TIMEOUT_S": str(MESSAGE_TIMEOUT_S),
        "MODGATE_WORKER__VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
    }
    [key] = upload(s3_client, bucket, 1, prefix="outbox-kill")
    hook = WebhookReceiver()
    cut = RedisCut(durable_redis.url, MODERATE_QUEUE)
    try:
        first = workers({**env, "MODGATE_REDIS__URL": cut.url}, name="first")
        # The producers' path: the outbox entry, then the message (straight to Redis).
        enqueuer = Enqueuer(load_settings(redis={"url": durable_redis.url}))
        enqueuer.send([Item(bucket=bucket, key=key)], ProducerRoute(bucket=bucket, callback_url=hook.url))
        [task_id] = [t.decode() for t in r.zrange(keys.OUTBOX, 0, -1)]
        sent_at = r.zscore(keys.OUTBOX, task_id)

        wait_for(cut.cut.is_set, timeout=30, what="the first worker to pop the message")
        assert cut.popped is not None and cut.popped["headers"]["id"] == task_id
        tag = cut.popped["properties"]["delivery_tag"]
        # The worker did try to record it as unacknowledged, and that is what was held.
        wait_for(lambda: tag.encode() in cut.held(), timeout=10, what="the worker's unacked record")
        held = cut.held()
        assert b"MULTI" in held and UNACKED_INDEX.encode() in held and b"HSET" in held, held[:500]
        first.kill()
        cut.stop()

        # Without the outbox it is lost: not queued, not unacknowledged, not published.
        assert not any(task_id.encode() in m for m in r.lrange(MODERATE_QUEUE, 0, -1))
        assert r.hget(UNACKED, tag) is None and r.zscore(UNACKED_INDEX, tag) is None
        assert not any(task_id.encode() in v for v in r.hvals(UNACKED))
        assert r.xlen(keys.VERDICT_STREAM) == 0
        # The outbox still has it, as the producer wrote it (the worker never ran it).
        assert r.zscore(keys.OUTBOX, task_id) == sent_at
        [item] = json.loads(r.hget(keys.OUTBOX_PAYLOADS, task_id))["items"]
        assert (item["bucket"], item["key"]) == (bucket, key)

        second = workers(env, name="second")

        def settled() -> bool:
            return (
                r.xlen(keys.VERDICT_STREAM) >= 1
                and len(hook.delivered()) >= 1
                and r.zcard(keys.OUTBOX) == 0
                and r.hlen(keys.OUTBOX_PAYLOADS) == 0
            )

        try:
            wait_for(settled, timeout=QUIET_S + 2 * RECONCILE_EVERY_S + 60, what="the outbox re-send")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}: stream {r.xlen(keys.VERDICT_STREAM)}, webhooks {len(hook.delivered())}, "
                f"outbox {r.zcard(keys.OUTBOX)}, queued {r.llen(MODERATE_QUEUE)}/{r.llen(WEBHOOK_QUEUE)}, "
                f"unacked {r.hlen(UNACKED)}\nsecond worker log:\n{second.tail(3000)}"
            ) from None
        time.sleep(2.0)  # a second copy of the verdict or of its webhook would show up now

        # Re-sent by the reconciler (not redelivered by kombu: there was nothing to redeliver).
        resent = re.search(r'modgate_messages_total\{outcome="resent"\} (\S+)', second.metrics())
        assert resent is not None and float(resent.group(1)) == 1.0, second.tail(3000)
        [(entry_id, _)] = r.xrange(keys.VERDICT_STREAM)
        [verdict] = verdicts(r)
        assert verdict["source"]["key"] == key and verdict["status"] == "ok", verdict
        [delivery] = hook.delivered()
        assert json.loads(delivery["body"])["id"] == verdict["id"]
        assert delivery["headers"]["Modgate-Event-Id"] == f"{verdict['id']}:{entry_id.decode()}"
        assert r.zcard(keys.OUTBOX) == 0 and r.hlen(keys.OUTBOX_PAYLOADS) == 0
        assert r.llen(MODERATE_QUEUE) == 0 and r.hlen(UNACKED) == 0
        published_s = int(entry_id.split(b"-")[0]) / 1000 - sent_at
        print(
            f"outbox re-send: verdict {published_s:.1f} s after the send (quiet period {QUIET_S} s, "
            f"reconciler every {RECONCILE_EVERY_S} s); test {time.monotonic() - started:.1f} s"
        )
    finally:
        cut.stop()
        hook.stop()
