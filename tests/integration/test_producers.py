"""Producers against real components: moto in server mode emits S3 event notifications
into SQS (directly, through SNS, through EventBridge) when objects are put; a real
redis-server receives the tasks; the HTTP receiver runs as `modgate serve-events`."""

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import boto3
import pytest
import redis

from modgate.keys import OUTBOX_PAYLOADS
from modgate.settings import load_settings
from producers.enqueuer import Enqueuer
from producers.events import ObjectEvent
from producers.sqs import SqsListener
from tests.servers import RedisServer, free_port

MODGATE = [sys.executable, "-m", "worker.cli"]
TRICKY = [
    "dir/a b.jpg",
    "dir/c+d.jpg",
    "dir/100%.jpg",
    "dir/ünï cødé 🐱.jpg",
    "deep/n/e/s/t/x.jpg",
    "q?x=1&y.jpg",
    # S3 allows control characters (moto stores all but the newline: its route is ".+").
    "dir/a\x01b\tc\x7f.jpg",
    "dir/esc\x1b[31m\x00\x85\x9b.jpg",
]


def queued(client, queue="modgate"):
    """The modgate.moderate payloads waiting in a Celery queue on Redis, oldest first."""
    out = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        envelope = json.loads(raw)
        assert envelope["headers"]["task"] == "modgate.moderate"
        assert envelope["content-type"] == "application/json"
        args, _kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        out.append(args[0])
    return out


def queued_keys(client):
    return [item["key"] for message in queued(client) for item in message["items"]]


@pytest.fixture
def aws(moto_server, s3_env):
    kw = {"endpoint_url": moto_server.url, "region_name": "us-east-1"}
    return {name: boto3.client(name, **kw) for name in ("s3", "sqs", "sns", "events")}


@pytest.fixture
def own_redis(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def settings_for(redis_url, **producer):
    return load_settings(
        redis={"url": redis_url}, producer={"sqs_wait_s": 1, "sqs_retry_after_s": 1, **producer}
    )


def make_queue(sqs, **attributes):
    name = f"q-{uuid.uuid4().hex[:8]}"
    url = sqs.create_queue(QueueName=name, Attributes={k: str(v) for k, v in attributes.items()})["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return url, arn


def notifying_queue(aws, bucket):
    """A queue that the bucket's object-created notifications go to (moto emits them itself)."""
    url, arn = make_queue(aws["sqs"])
    aws["s3"].put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]
        },
    )
    return url


def drain(listener, until, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listener.poll_once()
        if until():
            return
    raise AssertionError("listener did not get there in time")


def sqs_count(sqs, url):
    attrs = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def test_s3_to_sqs_keys_arrive_exactly_as_written_and_test_event_is_ignored(aws, bucket, own_redis):
    url = notifying_queue(aws, bucket)
    for key in TRICKY:
        aws["s3"].put_object(Bucket=bucket, Key=key, Body=b"img")
    aws["s3"].delete_object(Bucket=bucket, Key=TRICKY[0])  # not a create event: no notification configured
    r = redis.Redis.from_url(own_redis.url)
    listener = SqsListener(url, Enqueuer(settings_for(own_redis.url)), client=aws["sqs"])
    drain(listener, lambda: sqs_count(aws["sqs"], url) == 0)
    assert sorted(queued_keys(r)) == sorted(TRICKY)
    assert listener.stats.ignored >= 1  # the s3:TestEvent sent when notifications were configured
    assert all(i["etag"] and i["size"] == 3 for m in queued(r) for i in m["items"])


def test_sns_wrapped_and_eventbridge_notifications(aws, bucket, own_redis):
    url, arn = make_queue(aws["sqs"])
    topic = aws["sns"].create_topic(Name=f"t-{uuid.uuid4().hex[:8]}")["TopicArn"]
    aws["sns"].subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn)  # not raw: SNS envelope
    aws["s3"].put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "TopicConfigurations": [{"TopicArn": topic, "Events": ["s3:ObjectCreated:*"]}],
            "EventBridgeConfiguration": {},
        },
    )
    rule = f"r-{uuid.uuid4().hex[:8]}"
    aws["events"].put_rule(Name=rule, EventPattern=json.dumps({"source": ["aws.s3"]}))
    aws["events"].put_targets(Rule=rule, Targets=[{"Id": "q", "Arn": arn}])
    aws["s3"].put_object(Bucket=bucket, Key="via both/x y.jpg", Body=b"img")
    r = redis.Redis.from_url(own_redis.url)
    listener = SqsListener(url, Enqueuer(settings_for(own_redis.url)), client=aws["sqs"])
    drain(listener, lambda: sqs_count(aws["sqs"], url) == 0)
    assert listener.stats.malformed == 0
    # The same object announced twice (SNS and EventBridge): enqueued once.
    assert queued_keys(r) == ["via both/x y.jpg"]
    assert listener.stats.duplicates == 1


def test_redis_down_keeps_every_sqs_message_until_it_returns(aws, bucket, own_redis):
    url = notifying_queue(aws, bucket)
    listener = SqsListener(url, Enqueuer(settings_for(own_redis.url)), client=aws["sqs"])
    drain(listener, lambda: sqs_count(aws["sqs"], url) == 0)  # consume the TestEvent
    own_redis.stop()
    keys = [f"down/{i}.jpg" for i in range(8)]
    for key in keys:
        aws["s3"].put_object(Bucket=bucket, Key=key, Body=b"img")
    for _ in range(3):
        listener.poll_once()
    assert listener.stats.failed >= 1 and listener.stats.deleted == 1  # only the TestEvent
    assert sqs_count(aws["sqs"], url) == len(keys)
    own_redis.start()
    r = redis.Redis.from_url(own_redis.url)
    drain(listener, lambda: sqs_count(aws["sqs"], url) == 0, timeout=60)
    assert sorted(queued_keys(r)) == sorted(keys)


def test_malformed_messages_are_left_for_the_redrive_policy(aws, own_redis):
    dlq_url, dlq_arn = make_queue(aws["sqs"])
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"})
    url, _ = make_queue(aws["sqs"], VisibilityTimeout=1, RedrivePolicy=redrive)
    aws["sqs"].send_message(QueueUrl=url, MessageBody="this is not an S3 event")
    listener = SqsListener(url, Enqueuer(settings_for(own_redis.url)), client=aws["sqs"])
    drain(listener, lambda: sqs_count(aws["sqs"], dlq_url) == 1, timeout=30)
    assert listener.stats.malformed >= 2 and listener.stats.deleted == 0


def test_allowlist_routes_and_dedup(own_redis):
    settings = settings_for(
        own_redis.url,
        buckets=["ok-bucket"],
        routes=[
            {"bucket": "ok-bucket", "prefix": "", "tenant": "default-tenant"},
            {
                "bucket": "ok-bucket",
                "prefix": "vip/",
                "tenant": "vip",
                "callback_url": "https://h.example/x",
                "policy": "strict",
            },
        ],
    )
    enqueuer = Enqueuer(settings)
    events = [
        ObjectEvent("ok-bucket", "a.jpg", etag="1"),
        ObjectEvent("ok-bucket", "vip/b.jpg", etag="2"),
        ObjectEvent("other-bucket", "c.jpg", etag="3"),
        ObjectEvent("ok-bucket", "a.jpg", etag="1"),  # repeated notification
    ]
    first = enqueuer.enqueue_events(events)
    again = enqueuer.enqueue_events([*events[:2], ObjectEvent("ok-bucket", "a.jpg", etag="changed")])
    assert (first.enqueued, first.duplicates, first.refused) == (2, 1, 1)
    assert (again.enqueued, again.duplicates) == (1, 2)  # a new ETag is a new version
    messages = queued(redis.Redis.from_url(own_redis.url))
    by_tenant = {m["tenant"]: m for m in messages[:2]}
    assert (
        by_tenant["vip"]["policy"] == "strict" and by_tenant["vip"]["callback_url"] == "https://h.example/x"
    )
    assert by_tenant["default-tenant"]["items"] == [
        {"bucket": "ok-bucket", "key": "a.jpg", "version_id": None, "etag": "1", "size": None}
    ]


def run_cli(args, env):
    return subprocess.run(
        [*MODGATE, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def test_backfill_enqueues_each_key_exactly_once_and_resumes(aws, bucket, own_redis, s3_env):
    from concurrent.futures import ThreadPoolExecutor

    keys = [f"bf/{i:04d}.jpg" for i in range(1000)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: aws["s3"].put_object(Bucket=bucket, Key=k, Body=b"x" * 10), keys))
        list(
            pool.map(
                lambda k: aws["s3"].put_object(Bucket=bucket, Key=k, Body=b"x"), ["bf/notes.txt", "bf/z.PNG"]
            )
        )
    env = {**s3_env, "MODGATE_REDIS__URL": own_redis.url}
    r = redis.Redis.from_url(own_redis.url)

    dry = run_cli(
        ["enqueue", f"s3://{bucket}/bf/", "--suffix", ".jpg,.png", "--dry-run", "--no-progress"], env
    )
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["enqueued"] == 1001 and r.llen("modgate") == 0

    out = run_cli(["enqueue", f"s3://{bucket}/bf/", "--suffix", ".jpg", "--min-size", "5"], env)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["enqueued"] == 1000 and summary["listed"] == 1002 and summary["last_key"] == keys[-1]
    got = queued_keys(r)
    assert len(got) == 1000 and sorted(got) == keys
    assert max(len(m["items"]) for m in queued(r)) == 64 and summary["messages"] == 16
    assert "keys/s" in out.stderr

    r.delete("modgate")
    resumed = run_cli(
        [
            "enqueue",
            f"s3://{bucket}/bf/",
            "--suffix",
            ".jpg",
            "--start-after",
            keys[899],
            "--tenant",
            "t1",
            "--rate",
            "500",
        ],
        env,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert queued_keys(r) == keys[900:]
    assert {m["tenant"] for m in queued(r)} == {"t1"}

    own_redis.stop()  # Redis gone mid-backfill: a clear error and where to resume
    stopped = run_cli(["enqueue", f"s3://{bucket}/bf/", "--no-progress"], env)
    assert stopped.returncode == 3 and "backfill stopped after 0 keys" in stopped.stderr
    own_redis.start()


def start_receiver(redis_url, s3_env, auth):
    port = free_port()
    env = {
        **os.environ,
        **s3_env,
        "MODGATE_REDIS__URL": redis_url,
        "MODGATE_RECEIVER__MAX_BODY_BYTES": "4096",
        "MODGATE_PRODUCER__BUCKETS": '["allowed"]',
        **auth,
    }
    proc = subprocess.Popen(
        [*MODGATE, "serve-events", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(base + "/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    return proc, base


@pytest.fixture
def receiver(own_redis, s3_env):
    proc, base = start_receiver(own_redis.url, s3_env, {"MODGATE_RECEIVER__TOKEN": "tok-123"})
    yield base
    proc.terminate()
    proc.wait(10)


def post(url, body, token="tok-123"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def minio_body(keys, bucket="allowed"):
    from urllib.parse import quote_plus

    return {
        "EventName": "s3:ObjectCreated:Put",
        "Key": f"{bucket}/x",
        "Records": [
            {
                "eventVersion": "2.0",
                "eventSource": "minio:s3",
                "eventName": "s3:ObjectCreated:Put",
                "s3": {
                    "bucket": {"name": bucket},
                    "object": {"key": quote_plus(k), "size": 3, "eTag": "e" + str(i)},
                },
            }
            for i, k in enumerate(keys)
        ],
    }


def test_http_receiver_answers_each_case(receiver, own_redis):
    r = redis.Redis.from_url(own_redis.url)
    status, body, _ = post(receiver + "/events", minio_body(TRICKY))
    assert status == 202 and body == {
        "enqueued": len(TRICKY),
        "duplicates": 0,
        "refused": 0,
        "ignored": 0,
        "invalid": 0,
        "invalid_records": [],
    }
    assert sorted(queued_keys(r)) == sorted(TRICKY)
    assert post(receiver + "/events", minio_body(["a.jpg"], bucket="forbidden"))[1]["refused"] == 1
    assert post(receiver + "/events", minio_body(TRICKY))[1]["duplicates"] == len(TRICKY)
    assert post(receiver + "/events", minio_body(["a.jpg"]), token=None)[0] == 401
    assert post(receiver + "/events", minio_body(["a.jpg"]), token="wrong")[0] == 403
    status, body, _ = post(receiver + "/events", b"{not json")
    assert status == 400 and "malformed" in body["error"]
    assert post(receiver + "/events", minio_body([f"k{i}" * 20 for i in range(100)]))[0] == 413
    openapi = json.loads(urllib.request.urlopen(receiver + "/openapi.json", timeout=5).read())
    assert "/events" in openapi["paths"] and "/healthz" in openapi["paths"]
    own_redis.stop()
    status, body, headers = post(receiver + "/events", minio_body(["later.jpg"]))
    assert status == 503 and headers.get("retry-after") == "5"
    own_redis.start()
    assert post(receiver + "/events", minio_body(["later.jpg"]))[0] == 202


def test_lambda_handler_direct_and_sqs_batch(own_redis, monkeypatch):
    import producers.lambda_handler as lambda_handler

    monkeypatch.setenv("MODGATE_REDIS__URL", own_redis.url)
    monkeypatch.setattr(lambda_handler, "_enqueuer", None)
    direct = minio_body(["lambda a.jpg"])
    assert lambda_handler.handler(direct)["enqueued"] == 1
    batch = {
        "Records": [
            {"eventSource": "aws:sqs", "messageId": "m1", "body": json.dumps(minio_body(["lambda b.jpg"]))},
            {"eventSource": "aws:sqs", "messageId": "m2", "body": "garbage"},
        ]
    }
    out = lambda_handler.handler(batch)
    assert out["batchItemFailures"] == [{"itemIdentifier": "m2"}] and out["enqueued"] == 1
    assert sorted(queued_keys(redis.Redis.from_url(own_redis.url))) == ["lambda a.jpg", "lambda b.jpg"]


def test_http_receiver_with_hmac_signatures(own_redis, s3_env):
    from worker.delivery.webhooks import sign

    proc, base = start_receiver(
        own_redis.url, s3_env, {"MODGATE_RECEIVER__HMAC_SECRET": "hmac-key-0123456789"}
    )
    try:
        body = json.dumps(minio_body(["signed.jpg"])).encode()

        def send(signature):
            request = urllib.request.Request(base + "/events", data=body, method="POST")
            if signature:
                request.add_header("Modgate-Signature", signature)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert send(None) == 401
        assert send(sign(b"wrong-key-0123456789", body, int(time.time()))) == 403
        assert (
            send(sign(b"hmac-key-0123456789", body, int(time.time()) - 3600)) == 403
        )  # replayed an hour later
        assert send(sign(b"hmac-key-0123456789", body, int(time.time()))) == 202
        assert queued_keys(redis.Redis.from_url(own_redis.url)) == ["signed.jpg"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_receiver_refuses_to_start_without_auth(own_redis, s3_env):
    out = run_cli(
        ["serve-events", "--port", str(free_port())], {**s3_env, "MODGATE_REDIS__URL": own_redis.url}
    )
    assert out.returncode == 3 and "MODGATE_RECEIVER__TOKEN" in out.stderr


def s3_records(*records):
    return json.dumps({"Records": list(records)})


def s3_record(key, bucket="bkt-ok"):
    return {
        "eventSource": "aws:s3",
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 3, "eTag": "e-" + key}},
    }


def test_one_bad_sqs_message_never_aborts_deletion_of_the_good_ones(aws, own_redis):
    dlq_url, dlq_arn = make_queue(aws["sqs"])
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"})
    url, _ = make_queue(aws["sqs"], VisibilityTimeout=1, RedrivePolicy=redrive)
    bodies = [
        s3_records(s3_record("good-1.jpg")),
        json.dumps({"Records": [{"EventSource": "aws:sns", "Sns": "not an object"}]}),  # crashed the poll
        s3_records(s3_record("good-2.jpg"), s3_record("x.jpg", bucket="ab")),  # the queue refuses "ab"
        s3_records(s3_record("good-3.jpg")),
    ]
    aws["sqs"].send_message_batch(
        QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies)]
    )
    listener = SqsListener(url, Enqueuer(settings_for(own_redis.url)), client=aws["sqs"])
    drain(listener, lambda: sqs_count(aws["sqs"], dlq_url) == 2, timeout=60)
    assert sorted(queued_keys(redis.Redis.from_url(own_redis.url))) == [
        "good-1.jpg",
        "good-2.jpg",
        "good-3.jpg",
    ]
    assert listener.stats.deleted == 2 and listener.stats.invalid >= 2
    assert sqs_count(aws["sqs"], url) == 0  # both bad messages went to the dead-letter queue, not retried


def test_lambda_enqueues_the_valid_records_and_reports_the_rest(own_redis, monkeypatch):
    import producers.lambda_handler as lambda_handler
    from producers.events import MalformedEvent

    monkeypatch.setenv("MODGATE_REDIS__URL", own_redis.url)
    monkeypatch.setattr(lambda_handler, "_enqueuer", None)
    batch = {
        "Records": [
            {"eventSource": "aws:sqs", "messageId": "m1", "body": s3_records(s3_record("l-1.jpg"))},
            {
                "eventSource": "aws:sqs",
                "messageId": "m2",
                "body": s3_records(s3_record("l-2.jpg"), s3_record("x", bucket="ab")),
            },
        ]
    }
    out = lambda_handler.handler(batch)
    assert out["batchItemFailures"] == [{"itemIdentifier": "m2"}] and out["enqueued"] == 2
    direct = {
        "Records": [s3_record("l-3.jpg"), {**s3_record("y"), "s3": {"bucket": {"name": "bkt"}, "object": 5}}]
    }
    with pytest.raises(MalformedEvent, match="1 invalid record"):
        lambda_handler.handler(direct)
    assert sorted(queued_keys(redis.Redis.from_url(own_redis.url))) == ["l-1.jpg", "l-2.jpg", "l-3.jpg"]


def test_enqueuer_counts_what_the_queue_refuses_instead_of_raising(own_redis):
    enqueuer = Enqueuer(settings_for(own_redis.url))
    result = enqueuer.enqueue_events(
        [ObjectEvent("ab", "a.jpg"), ObjectEvent("bk\x00t", "a.jpg"), ObjectEvent("bkt", "ok.jpg", size=-1)]
    )
    assert (result.enqueued, result.invalid) == (0, 3)


def test_keys_with_control_characters_are_enqueued_exactly(aws, bucket, own_redis, s3_env):
    keys = ["ctl/a\x01b\tc\x7f.jpg", "ctl/nul\x00.jpg", "ctl/esc\x1b[2J\x85.jpg", "ctl/plain.jpg"]
    r = redis.Redis.from_url(own_redis.url)
    # Notifications (JSON with escapes, the key URL-encoded) and a duplicate of one.
    result = Enqueuer(settings_for(own_redis.url)).enqueue_events(
        [ObjectEvent("bkt", k, etag="1") for k in keys]
    )
    again = Enqueuer(settings_for(own_redis.url)).enqueue_events([ObjectEvent("bkt", keys[1], etag="1")])
    assert (result.enqueued, result.invalid, again.duplicates) == (4, 0, 1)
    assert queued_keys(r) == keys
    r.delete("modgate")
    # A backfill: botocore lists with EncodingType=url and decodes the keys.
    for key in keys:
        aws["s3"].put_object(Bucket=bucket, Key=key, Body=b"img")
    out = run_cli(
        ["enqueue", f"s3://{bucket}/ctl/", "--no-progress"], {**s3_env, "MODGATE_REDIS__URL": own_redis.url}
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["enqueued"] == 4 and sorted(queued_keys(r)) == sorted(keys)


def test_callback_userinfo_is_neither_stored_nor_echoed(own_redis):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as refused:
        settings_for(own_redis.url, routes=[{"bucket": "bkt", "callback_url": "https://u:s3cret@bad host/x"}])
    assert "s3cret" not in str(refused.value)
    settings = settings_for(
        own_redis.url, routes=[{"bucket": "bkt", "callback_url": "https://user:s3cret@hooks.example/x?a=1"}]
    )
    assert settings.producer.routes[0].callback_url == "https://hooks.example/x?a=1"
    Enqueuer(settings).enqueue_events([ObjectEvent("bkt", "cb.jpg", etag="1")])
    r = redis.Redis.from_url(own_redis.url)
    (message,) = queued(r)
    assert message["callback_url"] == "https://hooks.example/x?a=1"
    assert not any(b"s3cret" in v for v in r.hgetall(OUTBOX_PAYLOADS).values())
