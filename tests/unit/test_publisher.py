"""The results stream publisher against a real redis-server."""

import json

import redis

from modgate import keys
from modgate.errors import ErrorCode
from modgate.settings import ResultsSettings
from modgate.verdict import Source, Verdict, error_verdict
from worker.delivery.publisher import ResultPublisher

SOURCE = Source(kind="s3", uri="s3://b/k.jpg", bucket="b", key="k.jpg", etag="abc")


def ok_verdict(source=SOURCE):
    from modgate.verdict import verdict_id

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


def test_a_duplicate_gets_the_stored_entry_back_not_the_fresh_verdict(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    publisher = ResultPublisher(r, ResultsSettings())
    stored = ok_verdict()
    fresh = stored.model_copy(update={"decision": "unsafe"})  # the same id, judged differently later
    first = publisher.publish(stored)
    again = publisher.publish(fresh)
    assert again.duplicate and again.entry_id == first.entry_id
    assert again.body == first.body == stored.model_dump_json() != fresh.model_dump_json()
    ((_, fields),) = r.xrange(keys.VERDICT_STREAM)
    assert fields[b"verdict"].decode() == again.body


def test_duplicates_in_one_round_and_a_trimmed_entry(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    publisher = ResultPublisher(r, ResultsSettings())
    a, b = ok_verdict(), ok_verdict(SOURCE.model_copy(update={"key": "other"}))
    first_a, first_b = publisher.publish_many([a, b])
    again_a, again_b, new_c = publisher.publish_many(
        [a, b, ok_verdict(SOURCE.model_copy(update={"key": "c"}))]
    )
    assert (again_a.entry_id, again_b.entry_id) == (first_a.entry_id, first_b.entry_id)
    assert again_a.duplicate and again_b.duplicate and not new_c.duplicate
    r.xdel(keys.VERDICT_STREAM, first_a.entry_id)  # trimmed by MAXLEN since
    gone = publisher.publish(a)
    assert gone.duplicate and gone.entry_id == first_a.entry_id and gone.body is None


def test_the_readme_example_reads_published_verdicts(redis_server, capsys):
    """README "Example": the reader a newcomer copies sees what the publisher wrote."""
    import re
    from pathlib import Path

    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    ResultPublisher(r, ResultsSettings()).publish(ok_verdict())
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (snippet,) = [s for s in re.findall(r"```python\n(.*?)```", readme, re.S) if "xread" in s]
    exec(snippet.replace("redis://127.0.0.1:6379/0", redis_server.url), {})
    assert capsys.readouterr().out.split() == ["s3://b/k.jpg", "safe", "None"]


def test_new_verdicts_are_counted_per_minute_and_duplicates_are_not(redis_server):
    from modgate.verdict import CategoryResult

    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    publisher = ResultPublisher(r, ResultsSettings(stats_ttl_s=7200))
    flagged = ok_verdict(SOURCE.model_copy(update={"key": "nude.jpg"})).model_copy(
        update={
            "decision": "unsafe",
            "categories": {
                "sexual": CategoryResult(score=0.9, flagged=True, covered=True),
                "violence": CategoryResult(score=0.1, flagged=False, covered=True),
            },
        }
    )
    broken = error_verdict(SOURCE.model_copy(update={"key": "bad"}), "p1", ErrorCode.CORRUPT_IMAGE, "x")
    publisher.publish_many([ok_verdict(), flagged, broken])
    publisher.publish_many([ok_verdict(), flagged])  # a redelivered message: counted once
    counters = {}
    for key in r.scan_iter(match=keys.stats_minute(0).replace(":0", ":*")):
        assert 0 < r.ttl(key) <= 7200
        for field, value in r.hgetall(key).items():
            counters[field.decode()] = counters.get(field.decode(), 0) + int(value)
    assert counters["total"] == 3
    assert counters["status:ok"] == 2 and counters["status:error"] == 1
    assert counters["decision:safe"] == 1 and counters["decision:unsafe"] == 1
    assert counters["category:sexual"] == 1 and "category:violence" not in counters
