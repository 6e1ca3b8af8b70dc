"""Redis restarted under a running worker while producers keep sending: a graceful restart
(SHUTDOWN, AOF on) and a kill -9 with the persistence the project ships. Every key must
end in exactly one stream entry and every stream entry in exactly one webhook delivery."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest

from modgate import keys
from modgate.contract import Item
from modgate.settings import ProducerRoute, load_settings
from producers.enqueuer import Enqueuer
from tests.faults.conftest import shipped_redis_persistence
from tests.helpers import upload, wait_for
from tests.servers import WebhookReceiver

N_KEYS = 60
PER_MESSAGE = 3


def _send_steadily(url: str, bucket: str, keys_: list[str], hook: str, done: threading.Event) -> None:
    """A producer that keeps sending while Redis goes away, as an SQS listener does: a send
    Redis did not accept is tried again (a duplicate that slips through is harmless)."""
    enqueuer = Enqueuer(load_settings(redis={"url": url}))
    route = ProducerRoute(bucket=bucket, callback_url=hook)
    for i in range(0, len(keys_), PER_MESSAGE):
        items = [Item(bucket=bucket, key=k) for k in keys_[i : i + PER_MESSAGE]]
        while True:
            try:
                enqueuer.send(items, route)
                break
            except Exception:
                time.sleep(0.2)
        time.sleep(0.25)  # a steady trickle, so the restart lands mid-run
    done.set()


def test_the_shipped_redis_fsyncs_every_write():
    # docs/worker.md "Delivery guarantees": on a host crash or power loss (not a kill -9 of
    # redis-server: the page cache keeps those writes) everysec can lose the last second of
    # acknowledged writes (queued messages, their outbox entries, stream entries), and the
    # outbox lives in that same Redis, so nothing would re-send them.
    assert shipped_redis_persistence() == {"appendonly": True, "appendfsync": "always"}


@pytest.mark.parametrize("how", ["graceful", "kill9"])
def test_redis_restart_mid_run_keeps_one_entry_and_one_webhook_per_key(
    how, env, r, durable_redis, workers, s3_client, bucket
):
    env = {**env, "MODGATE_WORKER__MESSAGE_TIMEOUT_S": "10", "MODGATE_WORKER__VISIBILITY_TIMEOUT_S": "40"}
    keys_ = upload(s3_client, bucket, N_KEYS, prefix=f"restart-{how}")
    hook = WebhookReceiver()
    worker = workers(env, name="worker")
    sent = threading.Event()
    producer = threading.Thread(
        target=_send_steadily, args=(durable_redis.url, bucket, keys_, hook.url, sent), daemon=True
    )
    producer.start()
    wait_for(lambda: r.xlen(keys.VERDICT_STREAM) >= N_KEYS // 4, what="the first verdicts")
    assert not sent.is_set(), "the producer finished before Redis could be restarted"
    durable_redis.restart(graceful=how == "graceful", down_s=1.0)

    def settled() -> bool:
        entries = _entries(r)
        delivered = {json.loads(d["body"])["id"] for d in hook.delivered()}
        return (
            sent.is_set()
            and {e["key"] for e in entries} >= set(keys_)
            and delivered >= {e["verdict_id"] for e in entries}
            and r.zcard(keys.OUTBOX) == 0  # every message sent was finished by a worker
        )

    try:
        # Lost messages come back through the outbox after visibility + message timeout + 30 s.
        wait_for(settled, timeout=150, what="every key and every webhook after the restart")
    except AssertionError as exc:
        alive = "running" if worker.proc.poll() is None else f"exited with {worker.proc.returncode}"
        raise AssertionError(
            f"{exc}: {_state(r, hook, keys_)}; worker {alive}\nworker log:\n{worker.tail(3000)}"
        ) from None
    time.sleep(2.0)  # a duplicate entry or delivery would show up now

    entries = _entries(r)
    per_key = Counter(e["key"] for e in entries)
    assert set(per_key) == set(keys_)
    assert {k: n for k, n in per_key.items() if n != 1} == {}, "keys with more than one stream entry"
    assert all(e["status"] == "ok" for e in entries), [e for e in entries if e["status"] != "ok"]

    deliveries = hook.delivered()
    per_verdict = Counter(json.loads(d["body"])["id"] for d in deliveries)
    assert set(per_verdict) == {e["verdict_id"] for e in entries}
    assert {v: n for v, n in per_verdict.items() if n != 1} == {}, "verdicts delivered more than once"
    # The event id names the stream entry a delivery carries (DESIGN: webhook headers).
    expected = sorted(f"{e['verdict_id']}:{e['entry_id']}" for e in entries)
    assert sorted(d["headers"].get("Modgate-Event-Id") for d in deliveries) == expected
    hook.stop()


def _entries(r) -> list[dict]:
    out = []
    for entry_id, fields in r.xrange(keys.VERDICT_STREAM):
        verdict = json.loads(fields[b"verdict"])
        out.append(
            {
                "entry_id": entry_id.decode(),
                "verdict_id": verdict["id"],
                "key": verdict["source"]["key"],
                "status": verdict["status"],
                "code": (verdict.get("error") or {}).get("code"),
            }
        )
    return out


def _state(r, hook: WebhookReceiver, keys_: list[str]) -> str:
    entries = _entries(r)
    delivered = Counter(json.loads(d["body"])["id"] for d in hook.delivered())
    undelivered = [f"{e['key']}@{e['entry_id']}" for e in entries if e["verdict_id"] not in delivered]
    return (
        f"missing keys {sorted(set(keys_) - {e['key'] for e in entries})}, entries without a webhook "
        f"{undelivered}, webhooks sent twice {[v for v, n in delivered.items() if n > 1]}; "
        f"{len({e['key'] for e in entries})}/{len(keys_)} keys on the stream in {len(entries)} entries "
        f"({Counter(e['code'] or e['status'] for e in entries)}), {len(hook.delivered())} webhooks, "
        f"outbox {r.zcard(keys.OUTBOX)}, queued {r.llen('modgate')}/{r.llen('modgate.webhooks')}, "
        f"unacked {r.hlen('unacked')}"
    )
