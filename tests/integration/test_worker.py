"""``modgate worker`` as deployed: real worker processes consuming a real redis-server,
fetching from moto over HTTP, publishing to the results stream and POSTing webhooks to a
real HTTP receiver."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from celery import Celery

from modgate import keys
from modgate.contract import Item
from modgate.settings import ProducerRoute, load_settings
from producers.enqueuer import Enqueuer
from tests.faults.proxy import S3_SLOW_DOWN, Fault, FaultProxy
from tests.helpers import jpeg, upload, verdicts, wait_for
from tests.servers import WebhookReceiver, free_port
from worker.delivery.actions import outcome
from worker.delivery.webhooks import verify

SECRET = "whsec-test-secret-4711"
MODGATE = [sys.executable, "-m", "worker.cli"]


@pytest.fixture
def r(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    return client


@pytest.fixture
def producer(redis_server):
    app = Celery(broker=redis_server.url, set_as_current=False)
    app.conf.task_serializer = "json"

    def send(payload=None, *, args=None, kwargs=None):
        app.send_task(
            "modgate.moderate", args=args if args is not None else [payload], kwargs=kwargs, queue="modgate"
        )

    yield send
    app.close()


@pytest.fixture
def env(s3_env, redis_server):
    return {
        **s3_env,
        "MODGATE_REDIS__URL": redis_server.url,
        "MODGATE_DETECTORS__ENABLED": '["open_nsfw"]',
        "MODGATE_WEBHOOK__ALLOW_HOSTS": '["127.0.0.1"]',
        "MODGATE_WEBHOOK__SECRET": SECRET,
        "MODGATE_WEBHOOK__BACKOFF_BASE_S": "0.2",
        "MODGATE_WEBHOOK__MAX_ATTEMPTS": "3",
        "MODGATE_BATCH__MAX_WAIT_MS": "20",
    }


def test_every_key_gets_exactly_one_verdict_and_one_signed_webhook(
    env, r, producer, workers, s3_client, bucket
):
    good = upload(s3_client, bucket, 10)
    s3_client.put_object(Bucket=bucket, Key="bad/text.jpg", Body=b"this is not an image")
    s3_client.put_object(Bucket=bucket, Key="bad/empty.jpg", Body=b"")
    s3_client.put_object(Bucket=bucket, Key="bad/truncated.jpg", Body=jpeg(99)[:300])
    bad = ["bad/text.jpg", "bad/empty.jpg", "bad/truncated.jpg", "bad/missing.jpg"]
    hook = WebhookReceiver()
    worker = workers(env)
    # One-key messages and a multi-key message, mixed; a duplicate message on top.
    for key in good[:6]:
        producer({"items": [{"bucket": bucket, "key": key}], "callback_url": hook.url, "tenant": "acme"})
    producer({"items": [{"bucket": bucket, "key": k} for k in good[6:] + bad], "callback_url": hook.url})
    producer({"items": [{"bucket": bucket, "key": good[0]}], "callback_url": hook.url, "tenant": "acme"})
    expected = len(good) + len(bad)
    wait_for(
        lambda: r.xlen(keys.VERDICT_STREAM) >= expected and len(hook.delivered()) >= expected, what="verdicts"
    )
    time.sleep(1.0)  # anything extra (a duplicate) would show up now

    got = verdicts(r)
    assert len(got) == expected
    assert len({v["id"] for v in got}) == expected
    by_key = {v["source"]["key"]: v for v in got}
    assert set(by_key) == set(good) | set(bad)
    assert all(
        by_key[k]["status"] == "ok" and by_key[k]["decision"] in ("safe", "review", "unsafe") for k in good
    )
    assert all(set(by_key[k]["detectors"]) == {"open_nsfw"} for k in good)
    codes = {k: by_key[k]["error"]["code"] for k in bad}
    assert codes == {
        "bad/text.jpg": "unsupported_format",
        "bad/empty.jpg": "empty_object",
        "bad/truncated.jpg": "corrupt_image",
        "bad/missing.jpg": "not_found",
    }

    deliveries = hook.delivered()
    assert len(deliveries) == expected
    assert sorted(d["headers"]["Modgate-Verdict-Id"] for d in deliveries) == sorted(v["id"] for v in got)
    for d in deliveries:
        assert verify(SECRET.encode(), d["body"], d["headers"]["Modgate-Signature"])
        assert json.loads(d["body"])["id"] == d["headers"]["Modgate-Verdict-Id"]
        assert d["headers"]["Modgate-Event-Id"].startswith(d["headers"]["Modgate-Verdict-Id"] + ":")

    metrics = worker.metrics()
    assert 'modgate_published_total{result="duplicate"} 1.0' in metrics
    assert 'modgate_errors_total{code="not_found"} 1.0' in metrics
    assert "modgate_batch_size_count" in metrics and "modgate_queue_depth" in metrics
    assert SECRET not in worker.tail(10**7)
    hook.stop()


def test_invalid_messages_become_error_records_and_the_queue_moves_on(
    env, r, producer, workers, s3_client, bucket
):
    (key,) = upload(s3_client, bucket, 1)
    workers(env)
    producer({"items": []})
    producer({"items": [{"bucket": bucket}], "request_id": "req-1"})
    producer({"items": [{"bucket": bucket, "key": key}], "policy": "no-such-policy"})
    producer(args=[], kwargs={})
    producer({"items": [{"bucket": bucket, "key": key}], "surprise": True})
    pickler = Celery(broker=env["MODGATE_REDIS__URL"], set_as_current=False)
    pickler.conf.update(task_serializer="pickle", accept_content=["pickle"])
    pickler.send_task("modgate.moderate", args=[{"items": [{"bucket": bucket, "key": key}]}], queue="modgate")
    producer({"items": [{"bucket": bucket, "key": key}], "request_id": "after"})
    wait_for(lambda: any(v.get("request_id") == "after" for v in verdicts(r)), what="the valid message")
    time.sleep(0.5)
    got = verdicts(r)
    invalid = [v for v in got if v["status"] == "error"]
    assert len(invalid) == 5
    assert all(v["error"]["code"] == "invalid_message" and v["source"]["kind"] == "message" for v in invalid)
    reasons = " | ".join(v["error"]["message"] for v in invalid)
    assert "items" in reasons and "unknown policy 'no-such-policy'" in reasons and "surprise" in reasons
    assert any(v["request_id"] == "req-1" and v["source"]["bucket"] == bucket for v in invalid)
    (ok,) = [v for v in got if v["status"] == "ok"]  # none from the pickled message
    assert ok["source"]["key"] == key and ok["request_id"] == "after"
    assert r.llen("modgate") == 0 and r.hlen("unacked") == 0


def test_kill_9_mid_batch_loses_nothing_and_duplicates_nothing(env, r, producer, workers, s3_client, bucket):
    env = {
        **env,
        "MODGATE_WORKER__MESSAGE_TIMEOUT_S": "5",
        "MODGATE_WORKER__VISIBILITY_TIMEOUT_S": "35",
        "MODGATE_BATCH__MAX_BATCH": "4",
    }
    n = 60
    keys_ = upload(s3_client, bucket, n, prefix="crash")
    hook = WebhookReceiver()
    # The deployed topology: a GPU worker for moderation, webhooks on a CPU dispatcher.
    workers(env, name="dispatcher", queues="modgate.webhooks")
    first = workers(env, name="first", queues="modgate")
    # Sent the way producers send (with the outbox entry that lets a lost message be re-sent).
    enqueuer = Enqueuer(load_settings(redis={"url": env["MODGATE_REDIS__URL"]}))
    route = ProducerRoute(bucket=bucket, callback_url=hook.url)
    for key in keys_:
        enqueuer.send([Item(bucket=bucket, key=key)], route)
    wait_for(lambda: r.xlen(keys.VERDICT_STREAM) >= 3, what="the first verdicts")
    first.kill()
    assert r.xlen(keys.VERDICT_STREAM) < n, "the worker finished before it could be killed"
    workers(env, name="second", queues="modgate")
    wait_for(
        lambda: r.xlen(keys.VERDICT_STREAM) >= n and len(hook.delivered()) >= n,
        timeout=150,
        what="redelivery after the visibility timeout",
    )
    time.sleep(1.5)
    got = verdicts(r)
    assert len(got) == n and {v["source"]["key"] for v in got} == set(keys_)
    events = [d["headers"]["Modgate-Event-Id"] for d in hook.delivered()]
    assert len(events) == len(set(events)) == n
    assert r.zcard(keys.OUTBOX) == 0 and r.hlen(keys.OUTBOX_PAYLOADS) == 0  # every message finished
    hook.stop()


def test_webhook_500_then_200_is_delivered_once(env, r, producer, workers, s3_client, bucket):
    (key,) = upload(s3_client, bucket, 1)
    hook = WebhookReceiver(responses=[500, 503])
    workers(env)
    producer({"items": [{"bucket": bucket, "key": key}], "callback_url": hook.url})
    wait_for(lambda: len(hook.delivered()) == 1, what="delivery after retries")
    time.sleep(1.0)
    assert [req["status"] for req in hook.requests] == [500, 503, 200]
    final = hook.delivered()[0]
    assert final["headers"]["Modgate-Delivery-Attempt"] == "3"
    assert verify(SECRET.encode(), final["body"], final["headers"]["Modgate-Signature"])
    assert r.xlen(keys.WEBHOOK_DEAD_STREAM) == 0
    hook.stop()


def test_endpoint_down_goes_to_dead_letters_and_replay_delivers(env, r, producer, workers, s3_client, bucket):
    (key,) = upload(s3_client, bucket, 1)
    port = free_port()  # nothing listens here yet: connection refused
    url = f"http://127.0.0.1:{port}/hook"
    workers(env)
    producer({"items": [{"bucket": bucket, "key": key}], "callback_url": url})
    wait_for(lambda: r.xlen(keys.WEBHOOK_DEAD_STREAM) == 1, what="the dead letter")
    ((_, fields),) = r.xrange(keys.WEBHOOK_DEAD_STREAM)
    assert fields[b"attempts"] == b"3" and b"Connection" in fields[b"last_error"]

    listed = subprocess.run(
        [*MODGATE, "webhooks", "dead"], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert listed.returncode == 0 and url in listed.stdout

    hook = WebhookReceiver(port=port)
    replay = subprocess.run(
        [*MODGATE, "webhooks", "replay", "--all"], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert replay.returncode == 0, replay.stderr
    assert "replayed 1" in replay.stdout
    wait_for(lambda: len(hook.delivered()) == 1, what="the replayed delivery")
    (verdict,) = verdicts(r)
    assert hook.delivered()[0]["headers"]["Modgate-Verdict-Id"] == verdict["id"]
    assert r.xlen(keys.WEBHOOK_DEAD_STREAM) == 0
    hook.stop()


@pytest.mark.parametrize("target", ["169.254.169.254", "10.0.0.1"])
def test_callbacks_to_metadata_and_private_addresses_are_refused(
    target, env, r, producer, workers, s3_client, bucket
):
    (key,) = upload(s3_client, bucket, 1)
    workers(env)
    producer(
        {"items": [{"bucket": bucket, "key": key}], "callback_url": f"http://{target}/latest/meta-data/"}
    )
    wait_for(lambda: r.xlen(keys.WEBHOOK_DEAD_STREAM) == 1, what="the refusal")
    ((_, fields),) = r.xrange(keys.WEBHOOK_DEAD_STREAM)
    assert fields[b"last_error"].startswith(b"refused:") and target.encode() in fields[b"last_error"]
    assert fields[b"kind"] == b"refused" and b"delivery" not in fields  # refused before any attempt
    assert len(verdicts(r)) == 1  # the verdict itself is still published


def test_sigterm_drains_in_flight_messages_and_requeues_the_rest(
    env, r, producer, workers, s3_client, bucket
):
    env = {**env, "MODGATE_WORKER__DRAIN_TIMEOUT_S": "0.5", "MODGATE_BATCH__MAX_BATCH": "2"}
    n = 60
    keys_ = upload(s3_client, bucket, n, prefix="drain")
    first = workers(env, name="first")
    for i in range(0, n, 3):
        producer({"items": [{"bucket": bucket, "key": k} for k in keys_[i : i + 3]]})
    wait_for(lambda: r.xlen(keys.VERDICT_STREAM) >= 2, what="the first verdicts")
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(60) == 0
    assert r.xlen(keys.VERDICT_STREAM) < n, "nothing was left to drain"
    assert r.llen("modgate") > 0  # unfinished messages went back to the queue, not to 'unacked' limbo
    workers(env, name="second")
    wait_for(lambda: r.xlen(keys.VERDICT_STREAM) >= n, timeout=60, what="the requeued messages")
    time.sleep(1.0)
    got = verdicts(r)
    assert len(got) == n and {v["source"]["key"] for v in got} == set(keys_)


def test_health_key_and_probes(env, r, workers):
    worker = workers(env)
    import urllib.request

    assert urllib.request.urlopen(worker.base + "/livez", timeout=5).status == 200
    out = subprocess.run(
        [*MODGATE, "health", "--ready"], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert out.returncode == 0, out.stderr
    (state,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert state["ready"] and state["detectors"] == ["open_nsfw"] and "modgate" in state["queues"]
    assert state["pid"] == worker.proc.pid and r.ttl(keys.health(state["hostname"], state["pid"])) > 0


def test_a_named_policy_tags_the_object_and_gets_its_own_version(
    env, r, producer, workers, s3_client, bucket
):
    (key,) = upload(s3_client, bucket, 1)
    workers({**env, "MODGATE_POLICIES": '{"tagging": {"actions": {"tag": true}}}'})
    producer({"items": [{"bucket": bucket, "key": key}], "policy": "tagging"})
    producer({"items": [{"bucket": bucket, "key": key}]})  # the default policy: a separate verdict
    wait_for(lambda: r.xlen(keys.VERDICT_STREAM) >= 2, what="both verdicts")
    tagged, plain = sorted(verdicts(r), key=lambda v: not v["policy_version"].endswith("+tagging"))
    assert tagged["id"] != plain["id"] and plain["policy_actions"] is None
    # The stream says what the policy calls for; what happened is recorded by verdict id.
    assert tagged["policy_actions"] == {"tag": {"modgate-decision": tagged["decision"]}}
    assert tagged["actions"] is None
    wait_for(lambda: outcome(r, tagged["id"]) is not None, what="the action outcome")
    assert outcome(r, tagged["id"]) == {"tagged": {"modgate-decision": tagged["decision"]}}
    tags = s3_client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
    assert tags == [{"Key": "modgate-decision", "Value": tagged["decision"]}]


# -- backpressure, timeouts, actions after publishing, allowlist ------------------------


@pytest.fixture
def s3_proxy(moto_server):
    """moto behind a fault-injecting proxy: the worker's S3 traffic goes through it."""
    proxy = FaultProxy(moto_server.url)
    yield proxy
    proxy.stop()


def gets(proxy, key):
    """Object GETs of ``key`` (not ``?tagging``: error verdicts tag their object)."""
    return len(
        proxy.seen(
            lambda s: (
                s.method == "GET" and s.path.split("?")[0].endswith("/" + key) and "tagging" not in s.path
            )
        )
    )


def test_a_timed_out_message_is_requeued_and_finished_by_its_redelivery(
    env, r, producer, workers, s3_client, bucket, s3_proxy
):
    for key in ("fast.jpg", "slow-once.jpg", "slow-always.jpg"):
        s3_client.put_object(Bucket=bucket, Key=key, Body=jpeg(len(key)))
    slow_once = []

    def rule(method, path):
        if method != "GET":
            return None
        if path.split("?")[0].endswith("/slow-always.jpg"):
            return Fault(delay_s=8)
        if path.split("?")[0].endswith("/slow-once.jpg") and not slow_once:
            slow_once.append(path)
            return Fault(delay_s=8)
        return None

    s3_proxy.rule = rule
    worker = workers(
        {
            **env,
            "MODGATE_S3__ENDPOINT_URL": s3_proxy.url,
            "MODGATE_S3__MAX_ATTEMPTS": "1",
            "MODGATE_WORKER__MESSAGE_TIMEOUT_S": "3",
            "MODGATE_WORKER__VISIBILITY_TIMEOUT_S": "40",
            "MODGATE_WORKER__TIMEOUT_RETRIES": "1",
        }
    )
    producer(
        {"items": [{"bucket": bucket, "key": k} for k in ("fast.jpg", "slow-once.jpg")], "request_id": "a"}
    )
    producer({"items": [{"bucket": bucket, "key": "slow-always.jpg"}], "request_id": "b"})
    wait_for(lambda: r.xlen(keys.VERDICT_STREAM) >= 3, timeout=60, what="three verdicts")
    wait_for(lambda: r.llen("modgate") == 0 and r.hlen("unacked") == 0, what="both messages acknowledged")
    by_key = {v["source"]["key"]: v for v in verdicts(r)}
    assert len(verdicts(r)) == 3  # fast.jpg, finished before the timeout, was not published twice
    # Re-queued, not finalised as `timeout`: the redelivery finished it.
    assert by_key["fast.jpg"]["status"] == by_key["slow-once.jpg"]["status"] == "ok"
    # (The proxy records a request once it has answered it: the delayed ones come last.)
    wait_for(lambda: gets(s3_proxy, "slow-always.jpg") >= 2, what="the delayed GETs answered")
    assert gets(s3_proxy, "slow-once.jpg") == 2 and gets(s3_proxy, "fast.jpg") == 2
    # Re-queued at most TIMEOUT_RETRIES times, then a `timeout` verdict: no endless loop.
    assert by_key["slow-always.jpg"]["error"]["code"] == "timeout"
    assert by_key["slow-always.jpg"]["request_id"] == "b"
    assert gets(s3_proxy, "slow-always.jpg") == 2
    # The `timeout` verdict's object does not look moderated: tagged `error` (the policy default).
    tagged = lambda: s3_client.get_object_tagging(Bucket=bucket, Key="slow-always.jpg")["TagSet"]  # noqa: E731
    wait_for(lambda: tagged() == [{"Key": "modgate-decision", "Value": "error"}], what="the error tag")
    assert 'modgate_messages_total{outcome="requeued_timeout"} 2.0' in worker.metrics()
    assert not r.keys(keys.message_retries("*"))  # counters go with their finished messages
    assert "worker.buckets is unset" in worker.tail(10**6)


def test_a_failed_s3_action_is_retried_by_the_redelivered_duplicate(
    env, r, producer, workers, s3_client, bucket, s3_proxy
):
    (key,) = upload(s3_client, bucket, 1)
    failed = []

    def rule(method, path):
        # S3 sheds load on the tag requests of the first delivery (botocore's retries
        # included): the verdict is already on the stream when they fail, as if the worker
        # had crashed between publishing and acting. The message's re-queue ends it.
        if method == "PUT" and "tagging" in path and not r.keys(keys.message_retries("*")):
            failed.append(path)
            return Fault(status=503, body=S3_SLOW_DOWN)
        return None

    s3_proxy.rule = rule
    worker = workers(
        {
            **env,
            "MODGATE_S3__ENDPOINT_URL": s3_proxy.url,
            "MODGATE_S3__MAX_ATTEMPTS": "1",
            "MODGATE_POLICY__ACTIONS__TAG": "true",
        }
    )
    producer({"items": [{"bucket": bucket, "key": key}]})
    wait_for(lambda: r.xlen(keys.VERDICT_STREAM) == 1, what="the verdict")
    (verdict,) = verdicts(r)
    wait_for(lambda: outcome(r, verdict["id"]) is not None, what="the action outcome")
    assert failed, "the tag request never failed"
    assert verdict["policy_actions"] == {"tag": {"modgate-decision": verdict["decision"]}}
    assert outcome(r, verdict["id"]) == {"tagged": {"modgate-decision": verdict["decision"]}}
    tags = s3_client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
    assert tags == [{"Key": "modgate-decision", "Value": verdict["decision"]}]
    assert len(verdicts(r)) == 1  # the redelivery was a duplicate on the stream
    assert 'modgate_messages_total{outcome="requeued_actions"} 1.0' in worker.metrics()


def test_the_worker_allowlist_key_checks_and_redacted_s3_errors(env, r, producer, workers, s3_client, bucket):
    other = f"{bucket}-other"
    s3_client.create_bucket(Bucket=other)
    s3_client.put_object(Bucket=other, Key="x.jpg", Body=jpeg(1))
    (key,) = upload(s3_client, bucket, 1)
    worker = workers({**env, "MODGATE_WORKER__BUCKETS": json.dumps([bucket[:-1] + "?"])})
    items = [
        (bucket, key),
        (other, "x.jpg"),  # a producer of our own that knows nothing of the allowlist
        (bucket, "a/../img/000.jpg"),
        (bucket, "./img/000.jpg"),
        (bucket, "missing.jpg"),
    ]
    producer({"items": [{"bucket": b, "key": k} for b, k in items]})
    wait_for(lambda: r.xlen(keys.VERDICT_STREAM) >= len(items), what="the verdicts")
    by_key = {(v["source"]["bucket"], v["source"]["key"]): v for v in verdicts(r)}
    assert by_key[(bucket, key)]["status"] == "ok"
    codes = {k: by_key[k]["error"]["code"] for k in items[1:]}
    assert codes == {
        (other, "x.jpg"): "bucket_not_allowed",
        (bucket, "a/../img/000.jpg"): "invalid_key",
        (bucket, "./img/000.jpg"): "invalid_key",
        (bucket, "missing.jpg"): "not_found",
    }
    # S3's own words stay in the worker log; the stream entry carries a generic message.
    missing = by_key[(bucket, "missing.jpg")]["error"]["message"]
    assert "NoSuchKey" not in missing and "does not exist" in missing
    assert "NoSuchKey" in worker.tail(10**6)
    assert "worker.buckets is unset" not in worker.tail(10**6)


def test_a_worker_that_cannot_load_its_policy_detectors_exits_before_consuming(
    env, r, producer, tmp_path, bucket
):
    """Celery swallows what its start-up signal raises; the worker must still stop (exit 3)
    instead of consuming messages it cannot judge, and leave them on the queue."""
    policy = tmp_path / "logistic.yaml"
    sexual = {
        "fusion": "logistic",
        "weights": {"open_nsfw.nsfw": 3.0, "nudenet.sexual": 2.0},
        "bias": -2.0,
        "evidence": [{"detector": "open_nsfw", "score": "nsfw"}, {"detector": "nudenet", "score": "sexual"}],
    }
    policy.write_text(json.dumps({"version": "logit", "categories": {"sexual": sexual}}))
    producer({"items": [{"bucket": bucket, "key": "a.jpg"}]})
    proc = subprocess.run(
        [*MODGATE, "worker"],
        env={**os.environ, **env, "MODGATE_POLICY_FILE": str(policy), "MODGATE_WORKER__METRICS_PORT": "0"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "nudenet" in proc.stderr and "cannot start" in proc.stderr
    assert r.llen("modgate") == 1
    assert r.xlen(keys.VERDICT_STREAM) == 0
