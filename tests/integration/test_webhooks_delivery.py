"""Webhook delivery as deployed: real redis-server, real ``modgate worker`` processes (a
moderation worker, a CPU dispatcher), real HTTP receivers, one of them behind a slow-drip
proxy; and the service's publish → webhook-queue path against real Redis and Celery."""

import json
import statistics
import time
from unittest.mock import ANY

import pytest
import redis
from kombu.exceptions import OperationalError

from modgate import keys
from modgate.contract import validate_message
from modgate.errors import ErrorCode
from modgate.settings import load_settings
from modgate.signing import verify_headers
from modgate.verdict import Source, Verdict, error_verdict, verdict_id
from tests.faults.proxy import Fault, FaultProxy
from tests.helpers import upload, verdicts, wait_for
from tests.integration.test_worker import SECRET, env, producer, r  # noqa: F401 (fixtures)
from tests.servers import WebhookReceiver, free_port
from worker.delivery.webhooks import Delivery
from worker.service import celery_app
from worker.service.service import Requeue, Service


def readme_receiver(hook: WebhookReceiver, secret: str) -> list[dict]:
    """What a receiver following the README accepts: a valid signature, and each
    ``Modgate-Event-Id`` processed once."""
    seen: set[str] = set()
    accepted = []
    for req in hook.delivered():
        if not verify_headers(secret, req["body"], req["headers"]):
            continue
        event = req["headers"]["Modgate-Event-Id"]
        if event not in seen:
            seen.add(event)
            accepted.append(json.loads(req["body"]))
    return accepted


@pytest.fixture
def service(env, r):  # noqa: F811
    """The service's publish path with real Redis and a real Celery producer; deliveries are
    made by a dispatcher worker process started by the test."""
    settings = load_settings(
        redis={"url": env["MODGATE_REDIS__URL"]},
        webhook={"secret": SECRET, "allow_hosts": ["127.0.0.1"]},
        results={"transient_dedup_ttl_s": 1},
    )
    app = celery_app.create_app(settings)
    yield Service(settings, ["modgate"], celery_app.schedule_webhook(app), redis=r)
    app.close()


SOURCE = Source(kind="s3", uri="s3://bkt/photo.jpg", bucket="bkt", key="photo.jpg")


def ok(decision="safe"):
    return Verdict(
        id=verdict_id(SOURCE, "p1"), source=SOURCE, status="ok", decision=decision, policy_version="p1"
    )


def test_a_timeout_then_an_ok_verdict_for_one_object_both_reach_a_deduplicating_receiver(
    service,
    env,  # noqa: F811
    r,  # noqa: F811
    workers,
):
    hook = WebhookReceiver()
    workers(env, name="dispatcher", queues="modgate.webhooks")
    message = validate_message({"items": [{"bucket": "bkt", "key": "photo.jpg"}], "callback_url": hook.url})
    timed_out = error_verdict(SOURCE, "p1", ErrorCode.TIMEOUT, "not finished in time")
    assert timed_out.id == ok().id  # one object, one verdict id
    service._publish([timed_out], message, {"published": 0, "duplicates": 0})
    wait_for(lambda: len(hook.delivered()) == 1, what="the timeout verdict's webhook")
    time.sleep(1.2)  # the transient verdict's dedup marker (1 s here) runs out; the object is judged again
    service._publish([ok()], message, {"published": 0, "duplicates": 0})
    wait_for(lambda: len(hook.delivered()) == 2, what="the ok verdict's webhook")
    accepted = readme_receiver(hook, SECRET)
    assert [(v["id"], v["status"]) for v in accepted] == [(ok().id, "error"), (ok().id, "ok")]
    entries = [entry.decode() for entry, _ in r.xrange(keys.VERDICT_STREAM)]
    events = [req["headers"]["Modgate-Event-Id"] for req in hook.delivered()]
    assert events == [f"{ok().id}:{entry}" for entry in entries]
    hook.stop()


def test_a_duplicate_message_sends_the_stored_entry_not_a_fresh_body(
    service,
    env,  # noqa: F811
    r,  # noqa: F811
    workers,
):
    first_hook, second_hook = WebhookReceiver(), WebhookReceiver()
    workers(env, name="dispatcher", queues="modgate.webhooks")
    item = {"bucket": "bkt", "key": "photo.jpg"}
    message = validate_message({"items": [item], "callback_url": first_hook.url})
    service._publish([ok("safe")], message, {"published": 0, "duplicates": 0})
    # A redelivered copy that judged the object differently (another model revision, a retry):
    # the stream keeps the first verdict, and so must every webhook.
    counts = {"published": 0, "duplicates": 0}
    message = validate_message({"items": [item], "callback_url": second_hook.url})
    service._publish([ok("unsafe")], message, counts)
    assert counts == {"published": 0, "duplicates": 1}
    wait_for(lambda: first_hook.delivered() and second_hook.delivered(), what="both webhooks")
    ((entry, fields),) = r.xrange(keys.VERDICT_STREAM)
    for hook in (first_hook, second_hook):
        (req,) = hook.delivered()
        assert req["body"] == fields[b"verdict"]
        assert req["headers"]["Modgate-Event-Id"] == f"{ok().id}:{entry.decode()}"
    assert json.loads(second_hook.delivered()[0]["body"])["decision"] == "safe"
    first_hook.stop()
    second_hook.stop()


def test_a_broker_error_while_queueing_webhooks_requeues_the_message(env, r):  # noqa: F811
    def broker_down(delivery, countdown):
        raise OperationalError("Error 111 connecting to the broker")

    settings = load_settings(
        redis={"url": env["MODGATE_REDIS__URL"]},
        webhook={"url": "http://127.0.0.1:9/h", "allow_hosts": ["127.0.0.1"]},
    )
    service = Service(settings, ["modgate"], broker_down, redis=r)
    # A message that breaks the contract publishes its error records and queues their webhooks.
    with pytest.raises(Requeue, match="could not queue webhooks"):
        service.moderate("task-1", (), {})
    assert len(verdicts(r)) == 1  # published; the redelivery re-sends its stored entry


def test_deliver_requeues_on_redis_errors_and_dead_letters_what_it_cannot_parse(env, r):  # noqa: F811
    settings = load_settings(redis={"url": env["MODGATE_REDIS__URL"]})
    delivery = Delivery.new("v:1-0", "http://127.0.0.1:9/h", "{}", None).model_dump(mode="json")
    down = redis.Redis(port=free_port(), socket_connect_timeout=1)
    with pytest.raises(Requeue):
        Service(settings, ["modgate.webhooks"], lambda d, c: None, redis=down).deliver(delivery)
    service = Service(settings, ["modgate.webhooks"], lambda d, c: None, redis=r)
    assert service.deliver({"not": "a delivery"}) == "dead"
    ((_, fields),) = r.xrange(keys.WEBHOOK_DEAD_STREAM)
    assert fields[b"kind"] == b"invalid" and json.loads(fields[b"payload"]) == {"not": "a delivery"}


def test_a_refused_callback_is_dead_lettered_once_per_message(
    env,  # noqa: F811
    r,  # noqa: F811
    producer,  # noqa: F811
    workers,
    s3_client,
    bucket,
):
    keys_ = upload(s3_client, bucket, 6, prefix="refused")
    workers(env)
    url = "http://user:pw@10.0.0.1/latest/meta-data/"
    producer(
        {"items": [{"bucket": bucket, "key": k} for k in keys_], "callback_url": url, "request_id": "r1"}
    )
    wait_for(lambda: len(verdicts(r)) == 6, what="the verdicts")
    time.sleep(1.0)  # further dead letters would show up now
    ((_, fields),) = r.xrange(keys.WEBHOOK_DEAD_STREAM)
    assert fields[b"kind"] == b"refused" and fields[b"request_id"] == b"r1"
    assert fields[b"url"] == b"http://10.0.0.1/latest/meta-data/"  # no credentials stored
    assert b"delivery" not in fields and r.llen("modgate.webhooks") == 0


def test_one_dripping_endpoint_does_not_hold_up_the_others(env, r, workers):  # noqa: F811
    timeout_s, per_host, threads = 10, 2, 6
    env = {
        **{k: v for k, v in env.items() if k != "MODGATE_WEBHOOK__SECRET"},
        "MODGATE_WEBHOOK__TIMEOUT_S": str(timeout_s),
        "MODGATE_WEBHOOK__MAX_PER_HOST": str(per_host),
        "MODGATE_WORKER__CONCURRENCY": str(threads),
    }
    dispatcher = workers(env, name="dispatcher", queues="modgate.webhooks")
    assert "webhooks go out unsigned" in dispatcher.tail()
    tarpit = WebhookReceiver()
    drip = FaultProxy(tarpit.url)
    drip.rule = lambda method, path: Fault(drip_s=0.2, endless=True)  # a status line, then a header forever
    fast = [WebhookReceiver() for _ in range(3)]
    app = celery_app.create_app(load_settings(redis={"url": env["MODGATE_REDIS__URL"]}))
    schedule = celery_app.schedule_webhook(app)
    # The dripping tenant's deliveries go first: as many as the dispatcher has threads.
    for i in range(threads):
        schedule(Delivery.new(f"drip:{i}-0", f"{drip.url}/hook", "{}", "slow-tenant"), 0)
    wait_for(lambda: drip.seen(), what="the first POST to the dripping endpoint")
    sent: dict[str, float] = {}
    for i in range(10):
        for n, hook in enumerate(fast):
            event = f"fast-{n}:{i}-0"
            sent[event] = time.monotonic()
            schedule(Delivery.new(event, hook.url, "{}", f"tenant-{n}"), 0)
    wait_for(lambda: sum(len(h.delivered()) for h in fast) == 30, timeout=60, what="the other tenants")
    # Every other delivery landed while the dripping endpoint held at most its cap of connections
    # and its first POST had not even reached the deadline.
    assert len(drip.seen()) <= per_host
    latencies = sorted(
        req["at"] - sent[req["headers"]["Modgate-Event-Id"]] for h in fast for req in h.delivered()
    )
    p95 = statistics.quantiles(latencies, n=20)[-1]
    print(f"other endpoints' delivery latency while one drips: p50 {latencies[15]:.3f} s, p95 {p95:.3f} s")
    # The dripping POST is cut at the deadline and the endpoint's next delivery gets the slot.
    wait_for(lambda: len(drip.seen()) >= 2, timeout=timeout_s * 4, what="the deadline to cut the drip")
    assert 'modgate_webhook_deliveries_total{outcome="throttled"}' in dispatcher.metrics()
    app.close()
    drip.stop()
    for hook in (tarpit, *fast):
        hook.stop()


def test_the_console_finds_each_verdicts_tenant_and_every_url_its_events_went_to(service, r):  # noqa: F811
    """keys.verdict_meta: written at publish time for the review console's verdict.reviewed
    events; a copy of the message with another callback adds its URL, a later copy keeps both."""
    item = {"bucket": "bkt", "key": "photo.jpg"}
    first = validate_message({"items": [item], "callback_url": "http://127.0.0.1:9/a", "tenant": "acme"})
    service._publish([ok()], first, {"published": 0, "duplicates": 0})
    (entry,) = [e.decode() for e, _ in r.xrange(keys.VERDICT_STREAM)]
    record = json.loads(r.get(keys.verdict_meta(ok().id)))
    assert record == {"tenant": "acme", "urls": ["http://127.0.0.1:9/a"], "entry_id": entry}
    assert 0 < r.ttl(keys.verdict_meta(ok().id)) <= service.settings.results.meta_ttl_s
    second = validate_message({"items": [item], "callback_url": "http://127.0.0.1:9/b"})
    service._publish([ok()], second, {"published": 0, "duplicates": 0})
    record = json.loads(r.get(keys.verdict_meta(ok().id)))
    assert record["tenant"] == "acme" and sorted(record["urls"]) == [
        "http://127.0.0.1:9/a",
        "http://127.0.0.1:9/b",
    ]
    other = Source(kind="s3", uri="s3://bkt/x.jpg", bucket="bkt", key="x.jpg")
    quiet = Verdict(
        id=verdict_id(other, "p1"), source=other, status="ok", decision="safe", policy_version="p1"
    )
    service._publish(
        [quiet],
        validate_message({"items": [{"bucket": "bkt", "key": "x.jpg"}]}),
        {"published": 0, "duplicates": 0},
    )
    assert json.loads(r.get(keys.verdict_meta(quiet.id))) == {"tenant": None, "urls": [], "entry_id": ANY}
