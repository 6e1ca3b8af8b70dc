"""The results stream publisher against a real redis-server."""

import json

import redis

from worker import keys
from worker.errors import ErrorCode
from worker.publisher import ResultPublisher
from worker.settings import ResultsSettings
from worker.verdict import Source, Verdict, error_verdict

SOURCE = Source(kind="s3", uri="s3://b/k.jpg", bucket="b", key="k.jpg", etag="abc")


def ok_verdict(source=SOURCE):
    from worker.verdict import verdict_id

    return Verdict(
        id=verdict_id(source, "p1"), source=source, status="ok", decision="safe", policy_version="p1"
    )


def test_a_verdict_is_added_once(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    publisher = ResultPublisher(r, ResultsSettings())
    first = publisher.publish(ok_verdict())
    again = publisher.publish(ok_verdict())
    assert not first.duplicate and again.duplicate
    ((entry_id, fields),) = r.xrange(keys.VERDICT_STREAM)
    assert entry_id.decode() == first.entry_id
    assert json.loads(fields[b"verdict"])["id"] == first.verdict_id == fields[b"id"].decode()
    assert fields[b"decision"] == b"safe"
    assert r.get(keys.published_marker(first.verdict_id)).decode() == first.entry_id


def test_transient_errors_block_resends_only_briefly(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    publisher = ResultPublisher(r, ResultsSettings(dedup_ttl_s=86400, transient_dedup_ttl_s=60))
    broken = error_verdict(SOURCE, "p1", ErrorCode.CORRUPT_IMAGE, "bad bytes")
    flaky = error_verdict(SOURCE.model_copy(update={"key": "other"}), "p1", ErrorCode.FETCH_FAILED, "503")
    publisher.publish(broken)
    publisher.publish(flaky)
    assert 86000 < r.ttl(keys.published_marker(broken.id)) <= 86400
    assert 0 < r.ttl(keys.published_marker(flaky.id)) <= 60


def test_stream_is_trimmed_approximately(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    publisher = ResultPublisher(r, ResultsSettings(stream_maxlen=100))
    for i in range(1000):
        publisher.publish(ok_verdict(SOURCE.model_copy(update={"key": f"k{i}"})))
    assert 100 <= r.xlen(keys.VERDICT_STREAM) < 1000
