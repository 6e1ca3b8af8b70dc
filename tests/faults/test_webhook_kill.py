"""kill -9 of the process that POSTs webhooks: webhooks are delivered at least once per
event, not exactly once. A dispatcher killed after the receiver accepted a POST and
before it wrote the done marker leaves the task unacknowledged; its redelivery POSTs the
same event again. Every copy must carry the same event id and the same body (the stream
entry as stored), no event may be lost, and the Redis bookkeeping (pending set, done
markers, leases, per-host slots) must end clean."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter, defaultdict
from typing import Any

import pytest

from modgate import keys
from modgate.contract import MODERATE_QUEUE, WEBHOOK_QUEUE, Item
from modgate.settings import ProducerRoute, load_settings
from modgate.signing import verify
from producers.enqueuer import Enqueuer
from tests.faults.conftest import SECRET
from tests.faults.holding_sink import HoldingSink
from tests.helpers import upload, wait_for
from worker.delivery.webhooks import Delivery

N_ENTRIES = 60
ANSWERED_FIRST = 20  # answered at once: their done markers exist before the kill
THREADS = 8  # dispatcher threads: all of them end up waiting on the held 2xx
WEBHOOK_TIMEOUT_S = 10  # the POST deadline: the kill must come before it cuts a held POST

# Short enough for the suite: the killed process's messages come back after the
# visibility timeout (+ at most one 5 s sweep); its leases and host slots run out after
# webhook.timeout_s + 30 s. message_timeout_s only matters to moderation; the visibility
# timeout must stay at least 30 s above it (settings refuse less).
SHORT = {
    "MODGATE_WORKER__MESSAGE_TIMEOUT_S": "5",
    "MODGATE_WORKER__VISIBILITY_TIMEOUT_S": "35",
    "MODGATE_WEBHOOK__TIMEOUT_S": str(WEBHOOK_TIMEOUT_S),
}


def test_dispatcher_killed_while_the_receiver_holds_its_2xx_delivers_every_event_at_least_once(
    env, r, workers, s3_client, bucket
):
    started = time.monotonic()
    env = {
        **env,
        **SHORT,
        # Above the dispatcher's threads, so the held POSTs never throttle one another and
        # the fresh dispatcher is not made to wait for the dead one's slots to expire.
        "MODGATE_WEBHOOK__MAX_PER_HOST": str(2 * THREADS),
    }
    dispatcher_env = {**env, "MODGATE_WORKER__CONCURRENCY": str(THREADS)}
    keys_ = upload(s3_client, bucket, N_ENTRIES, prefix="whkill")
    sink = HoldingSink(hold_after=ANSWERED_FIRST)
    try:
        workers(env, name="moderation", queues=MODERATE_QUEUE)
        _send(env, bucket, keys_, sink.url)
        # Every delivery is queued before a dispatcher runs: then the hold fills all THREADS
        # threads at once, whatever the moderation speed, and the kill lands on exactly those.
        wait_for(lambda: r.llen(WEBHOOK_QUEUE) >= N_ENTRIES, timeout=120, what="every delivery on the queue")
        first = workers(dispatcher_env, name="dispatcher", queues=WEBHOOK_QUEUE)
        wait_for(lambda: sink.holding() >= THREADS, timeout=WEBHOOK_TIMEOUT_S / 2, what="every thread held")
        first.kill()  # SIGKILL, while the sink holds THREADS 2xx answers
        held_at_kill = sink.holding()
        assert held_at_kill == THREADS
        at_kill = sink.requests()
        # Received by the sink and not marked done: the deliveries a redelivery POSTs again.
        in_flight = {
            req["headers"]["Modgate-Event-Id"]
            for req in at_kill
            if not r.exists(keys.delivered_marker(_delivery_id(req["headers"]["Modgate-Event-Id"], sink.url)))
        }
        sink.release()  # from now on the sink answers 2xx at once
        second = workers(dispatcher_env, name="dispatcher-2", queues=WEBHOOK_QUEUE)
        killed_at = time.monotonic()

        entries = _entries(r)
        assert {e["key"] for e in entries} >= set(keys_), "keys without a stream entry"
        # The held deliveries come back through the visibility timeout (kombu's unacked
        # sweep, run here by the moderation worker and the fresh dispatcher) after 35-40 s;
        # a copy that finds the dead process's lease (40 s) still there is re-queued until
        # it runs out ("busy"). Not through the reconciler: resend_lost re-sends only
        # deliveries quiet for visibility + 60 s. The longer timeout below leaves it room
        # for a task kombu lost outright (popped, not yet recorded as unacked), which the
        # kill should not hit here: with every thread held, the killed consumer was not reading.
        try:
            wait_for(lambda: _settled(r, sink, entries), timeout=150, what="every event delivered, settled")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}: {_state(r, sink, entries)}\nfresh dispatcher log:\n{second.tail(3000)}"
            ) from None
        time.sleep(2.0)  # a stray extra copy would show up now

        copies = _check_copies(sink.requests(), entries)
        duplicated = {event for event, n in copies.items() if n > 1}
        assert in_flight, "no delivery was in flight at the kill: the duplicate path was not exercised"
        assert all(req["held"] for req in at_kill if req["headers"]["Modgate-Event-Id"] in in_flight)
        # Every delivery in flight at the kill is POSTed once more, and nothing else is.
        assert duplicated == in_flight
        assert max(copies.values()) == 2
        _check_clean(r, entries, sink.url)
        duplicates = sum(copies.values()) - len(copies)
        settled_s, wall_s = time.monotonic() - killed_at, time.monotonic() - started
        print(
            f"\nwebhook kill: {len(entries)} entries, {held_at_kill} held at the kill, "
            f"{duplicates} duplicates, settled {settled_s:.0f} s after the kill, {wall_s:.0f} s in all"
        )
    finally:
        sink.stop()


def _send(env: dict[str, str], bucket: str, keys_: list[str], url: str, every_s: float = 0.0) -> None:
    """One key per message, the way producers send (with the outbox entry), ``every_s`` apart."""
    enqueuer = Enqueuer(load_settings(redis={"url": env["MODGATE_REDIS__URL"]}))
    route = ProducerRoute(bucket=bucket, callback_url=url)
    for key in keys_:
        enqueuer.send([Item(bucket=bucket, key=key)], route)
        time.sleep(every_s)


def _delivery_id(event: str, url: str) -> str:
    return Delivery.new(event, url, "", None).delivery_id


def _entries(r: Any) -> list[dict[str, Any]]:
    out = []
    for entry_id, fields in r.xrange(keys.VERDICT_STREAM):
        verdict = json.loads(fields[b"verdict"])
        out.append(
            {
                "event": f"{verdict['id']}:{entry_id.decode()}",
                "verdict_id": verdict["id"],
                "key": verdict["source"]["key"],
                "body": fields[b"verdict"],
            }
        )
    return out


def _received(requests: list[dict[str, Any]]) -> set[str]:
    return {req["headers"].get("Modgate-Event-Id") for req in requests}


def _settled(r: Any, sink: HoldingSink, entries: list[dict[str, Any]]) -> bool:
    return (
        {e["event"] for e in entries} <= _received(sink.requests())
        and r.zcard(keys.WEBHOOK_PENDING) == 0
        and all(r.exists(keys.delivered_marker(_delivery_id(e["event"], sink.url))) for e in entries)
    )


def _check_copies(requests: list[dict[str, Any]], entries: list[dict[str, Any]]) -> Counter[str]:
    """Every stream entry reached the sink; every copy of an event carries that event's id
    in both headers and, byte for byte, the stream entry's body. Returns copies per event."""
    by_event = {e["event"]: e for e in entries}
    copies: Counter[str] = Counter()
    bodies: dict[str, set[bytes]] = defaultdict(set)
    for req in requests:
        event = req["headers"].get("Modgate-Event-Id")
        assert event in by_event, f"an event that is no stream entry: {event}"
        assert req["headers"].get("webhook-id") == event
        assert req["headers"].get("Modgate-Verdict-Id") == by_event[event]["verdict_id"]
        assert verify(SECRET.encode(), req["body"], req["headers"]["Modgate-Signature"])
        bodies[event].add(req["body"])
        copies[event] += 1
    assert set(copies) == set(by_event), f"events lost: {sorted(set(by_event) - set(copies))}"
    differing = {event: len(b) for event, b in bodies.items() if b != {by_event[event]["body"]}}
    assert differing == {}, "events whose copies differ from the stream entry"
    return copies


def _check_clean(r: Any, entries: list[dict[str, Any]], url: str) -> None:
    """Nothing pending, a done marker per delivery, no lease left, no host slot alive, no dead letter."""
    assert r.zcard(keys.WEBHOOK_PENDING) == 0 and r.hlen(keys.WEBHOOK_PENDING_PAYLOADS) == 0
    markers = {r.get(keys.delivered_marker(_delivery_id(e["event"], url))) for e in entries}
    assert markers == {b"delivered"}
    assert list(r.scan_iter(match=keys.delivery_lease("*"))) == []
    host = url.split("/")[2]
    seconds, micros = r.time()
    now_ms = seconds * 1000 + micros // 1000
    # Slots of the killed dispatcher stay in the set until they expire; none may still count.
    assert r.zrangebyscore(keys.webhook_host_slots(host), f"({now_ms}", "+inf") == []
    assert r.xlen(keys.WEBHOOK_DEAD_STREAM) == 0
    assert r.llen(WEBHOOK_QUEUE) == 0 and r.hlen("unacked") == 0


def _state(r: Any, sink: HoldingSink, entries: list[dict[str, Any]]) -> str:
    received = _received(sink.requests())
    missing = [e["event"] for e in entries if e["event"] not in received]
    return (
        f"{len(entries)} entries, {len(sink.requests())} POSTs, {len(missing)} events not received "
        f"{missing[:5]}, pending {r.zcard(keys.WEBHOOK_PENDING)}, queued {r.llen(WEBHOOK_QUEUE)}, "
        f"unacked {r.hlen('unacked')}, leases {len(list(r.scan_iter(match=keys.delivery_lease('*'))))}"
    )


N_USER = 60
# Two workers moderate tens of keys a second: sent at this pace, the kill lands before the
# last key is even sent, whatever the random point.
SEND_EVERY_S = 0.05


@pytest.mark.parametrize("seed", [4711])
def test_two_workers_on_both_queues_one_killed_at_a_random_point_lose_no_event(
    seed, env, r, workers, s3_client, bucket
):
    """As a new user runs it: two `modgate worker` processes with the default queues (both),
    objects in the bucket enqueued, the first worker SIGKILLed at a random point (seeded)."""
    started = time.monotonic()
    rng = random.Random(seed)
    env = {**env, **SHORT}
    keys_ = upload(s3_client, bucket, N_USER, prefix=f"user-{seed}")
    sink = HoldingSink()  # answers at once
    try:
        first = workers(env, name="first")  # the queues `modgate worker` consumes by default
        workers(env, name="second")
        producer = threading.Thread(
            target=_send, args=(env, bucket, keys_, sink.url, SEND_EVERY_S), daemon=True
        )
        producer.start()
        kill_after = rng.randint(N_USER // 5, N_USER // 2)
        wait_for(lambda: r.xlen(keys.VERDICT_STREAM) >= kill_after, timeout=120, what="the first verdicts")
        time.sleep(rng.uniform(0.0, 0.3))
        first.kill()
        killed_at = time.monotonic()
        on_stream_at_kill = r.xlen(keys.VERDICT_STREAM)
        assert on_stream_at_kill < N_USER, "the workers finished before one could be killed"

        def settled() -> bool:
            entries = _entries(r)
            return (
                not producer.is_alive()
                and {e["key"] for e in entries} >= set(keys_)
                and r.zcard(keys.OUTBOX) == 0
                and _settled(r, sink, entries)
            )

        # The killed worker's messages (moderation and webhook) come back after the
        # visibility timeout. This worker reads both queues without pause, so the kill often
        # (about half the runs here) lands between kombu's BRPOP and its unacked record: that
        # message is then only in the outbox (moderation, re-sent by the reconciler after
        # visibility + message timeout + 30 s) or in modgate:webhooks:pending (a delivery,
        # re-sent by resend_lost after visibility + 60 s), so settling takes up to ~115 s.
        try:
            wait_for(settled, timeout=180, what="every key and every event after the kill")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {_state(r, sink, _entries(r))}") from None
        settled_s = time.monotonic() - killed_at
        time.sleep(2.0)

        entries = _entries(r)
        per_key = Counter(e["key"] for e in entries)
        assert {k: n for k, n in per_key.items() if n != 1} == {}, "keys with more than one stream entry"
        copies = _check_copies(sink.requests(), entries)
        _check_clean(r, entries, sink.url)
        assert r.zcard(keys.OUTBOX) == 0 and r.hlen(keys.OUTBOX_PAYLOADS) == 0
        print(
            f"\nwebhook kill (seed {seed}): killed at {on_stream_at_kill}/{len(entries)} entries, "
            f"{sum(copies.values()) - len(copies)} duplicates, settled {settled_s:.0f} s after the kill, "
            f"{time.monotonic() - started:.0f} s in all"
        )
    finally:
        sink.stop()
