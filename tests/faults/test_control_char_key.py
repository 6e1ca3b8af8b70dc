"""Keys with control characters among a normal backlog, through a real worker: S3 allows
every character in a key (U+0000-001F and U+007F-009F included), so such an upload must
be moderated like any other, never dropped. Each arrives by one producer path: the HTTP
receiver (`modgate serve-events`), S3 → SQS notifications (moto emits them; the SQS
listener), and a backfill (`modgate enqueue s3://bucket/prefix`). Every key gets exactly
one verdict whose ``source`` holds the key exactly, with both S3 GET clients; the worker's
and the receiver's text logs carry none of those characters raw.

moto cannot store a key with a newline (its URL route is ``.+`` without DOTALL: 404), so
that key goes through the receiver and the worker to a ``not_found`` verdict; real S3
stores it, and both GET clients percent-encode it like the others."""

from __future__ import annotations

import json
import re
import time
import uuid
from urllib.parse import quote_plus

import boto3
import pytest

from modgate import keys
from modgate.settings import load_settings
from producers.enqueuer import Enqueuer
from producers.sqs import SqsListener
from tests.helpers import jpeg, wait_for
from tests.integration.test_producers import run_cli
from tests.integration.test_receiver_inputs import Receiver, post

CONTROL = ["ctl/a\x01b\tc\x7f.jpg", "ctl/esc\x1b[31m\x00\x85\x9b.jpg", "ctl/cr\r\x0b\x0c\x1f.jpg"]
# What a forged log record would look like, after the newline.
FORGED = "2026-01-01 00:00:00,000 ERROR forged"
NEWLINE = f"ctl/x\n{FORGED}.jpg"
N_NORMAL = 30  # per path
RAW_CONTROL = re.compile(rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]")


def minio_record(bucket: str, key: str) -> dict:
    return {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "eventName": "s3:ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(key)}},
    }


@pytest.mark.parametrize("get_client", ["lean", "botocore"])
def test_control_character_keys_get_exactly_one_verdict_by_every_path(
    get_client, env, r, workers, moto_server, s3_client, tmp_path
):
    env = {**env, "MODGATE_S3__ENDPOINT_URL": moto_server.url, "MODGATE_S3__GET_CLIENT": get_client}
    aws = {"endpoint_url": moto_server.url, "region_name": "us-east-1"}
    sqs = boto3.client("sqs", **aws)
    buckets = {path: f"ctl-{path}-{uuid.uuid4().hex[:8]}" for path in ("receiver", "sqs", "backfill")}
    for name in buckets.values():
        s3_client.create_bucket(Bucket=name)
    queue = sqs.create_queue(QueueName=f"ctl-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3_client.put_bucket_notification_configuration(
        Bucket=buckets["sqs"],
        NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]
        },
    )
    expected: dict[tuple[str, str], str] = {}  # (bucket, key) -> "ok" or the error code
    for n, bucket in enumerate(buckets.values()):
        # The control-character keys in the middle of the backlog, sharing its messages.
        names = [f"ctl/n{i:03d}.jpg" for i in range(N_NORMAL)]
        for i, key in enumerate(CONTROL):
            names.insert((i + 1) * N_NORMAL // (len(CONTROL) + 1), key)
        for i, key in enumerate(names):
            s3_client.put_object(Bucket=bucket, Key=key, Body=jpeg(n * 100 + i, 96, 64))
            expected[(bucket, key)] = "ok"
    assert {o["Key"] for o in s3_client.list_objects_v2(Bucket=buckets["backfill"])["Contents"]} >= set(
        CONTROL
    )

    worker = workers(env, queues="modgate")
    # 1. The HTTP receiver, the newline key among them.
    receiver = Receiver(
        env["MODGATE_REDIS__URL"], tmp_path / "receiver.log", MODGATE_RECEIVER__TOKEN="tok-123"
    )
    try:
        rx_keys = [k for (b, k) in expected if b == buckets["receiver"]]
        rx_keys.insert(len(rx_keys) // 2, NEWLINE)
        expected[(buckets["receiver"], NEWLINE)] = "not_found"
        status, answer = post(
            receiver.base + "/events", {"Records": [minio_record(buckets["receiver"], k) for k in rx_keys]}
        )
        assert status == 202 and answer["enqueued"] == len(rx_keys) and answer["invalid"] == 0, answer
    finally:
        receiver.stop()
    # 2. S3 → SQS notifications.
    settings = load_settings(redis={"url": env["MODGATE_REDIS__URL"]}, producer={"sqs_wait_s": 1})
    listener = SqsListener(queue, Enqueuer(settings), client=sqs)
    deadline = time.monotonic() + 60
    while listener.stats.enqueued < N_NORMAL + len(CONTROL):
        assert time.monotonic() < deadline, f"the SQS listener stopped at {listener.stats}"
        listener.poll_once()
    assert listener.stats.invalid == 0
    # 3. A backfill of the prefix.
    out = run_cli(["enqueue", f"s3://{buckets['backfill']}/ctl/", "--no-progress"], env)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["enqueued"] == summary["listed"] == N_NORMAL + len(CONTROL)

    def verdicts() -> dict[tuple[str, str], list[dict]]:
        got: dict[tuple[str, str], list[dict]] = {}
        for _, fields in r.xrange(keys.VERDICT_STREAM):
            v = json.loads(fields[b"verdict"])
            got.setdefault((v["source"]["bucket"], v["source"]["key"]), []).append(v)
        return got

    try:
        wait_for(lambda: set(verdicts()) >= set(expected) and r.zcard(keys.OUTBOX) == 0, 240, "every verdict")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {len(verdicts())}/{len(expected)}\n{worker.tail(3000)}") from None
    got = verdicts()
    assert set(got) == set(expected)
    assert {k: len(v) for k, v in got.items() if len(v) != 1} == {}, "keys with more than one verdict"
    outcomes = {
        k: v[0]["status"] if v[0]["status"] == "ok" else v[0]["error"]["code"] for k, v in got.items()
    }
    assert outcomes == expected
    for (bucket, key), (v,) in got.items():
        assert v["source"]["uri"] == f"s3://{bucket}/{key}"
    # No raw control character in any log line, no record forged by the newline key.
    for log in (worker.log_path.read_bytes(), (tmp_path / "receiver.log").read_bytes()):
        assert RAW_CONTROL.findall(log) == []
        assert not any(line.startswith(FORGED.encode()) for line in log.splitlines())
