"""The whole product on real components: objects uploaded to a bucket with event
notifications → moto puts the events on SQS → `modgate listen sqs` enqueues them →
`modgate worker` moderates them → one verdict per object on the results stream."""

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import boto3
import redis

from modgate import keys
from tests.servers import WorkerProcess
from worker.tools.samples import photo


def test_upload_to_verdict_through_sqs_listener_and_worker(
    moto_server, s3_env, s3_client, bucket, redis_server, tmp_path
):
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    sqs = boto3.client("sqs", endpoint_url=moto_server.url, region_name="us-east-1")
    url = sqs.create_queue(QueueName=f"e2e-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3_client.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]
        },
    )
    env = {
        **s3_env,
        "MODGATE_REDIS__URL": redis_server.url,
        "MODGATE_DETECTORS__ENABLED": '["open_nsfw"]',
        "MODGATE_PRODUCER__SQS_WAIT_S": "1",
        "AWS_ENDPOINT_URL_SQS": moto_server.url,  # boto3's own per-service endpoint variable
    }
    worker = WorkerProcess(env, tmp_path / "worker.log")
    listener = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "listen", "sqs", url],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "listener.log", "wb"),  # noqa: SIM115
    )
    try:
        uploaded = []
        for i, key in enumerate(["uploads/a cat.jpg", "uploads/2026/ü+%.jpg", "uploads/bad.jpg"]):
            buf = io.BytesIO()
            photo(320, 240, i).save(buf, "JPEG")
            body = buf.getvalue() if "bad" not in key else b"corrupt"
            s3_client.put_object(Bucket=bucket, Key=key, Body=body)
            uploaded.append(key)
        deadline = time.monotonic() + 90
        while r.xlen(keys.VERDICT_STREAM) < len(uploaded) and time.monotonic() < deadline:
            time.sleep(0.2)
        verdicts = [json.loads(f[b"verdict"]) for _, f in r.xrange(keys.VERDICT_STREAM)]
        assert sorted(v["source"]["key"] for v in verdicts) == sorted(uploaded), worker.tail()
        by_key = {v["source"]["key"]: v for v in verdicts}
        assert by_key["uploads/bad.jpg"]["error"]["code"] == "unsupported_format"
        assert by_key["uploads/a cat.jpg"]["status"] == "ok"
        listener.send_signal(signal.SIGTERM)
        assert listener.wait(30) == 0
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
        assert attrs["Attributes"]["ApproximateNumberOfMessages"] == "0"
    finally:
        if listener.poll() is None:
            listener.kill()
        worker.stop()
