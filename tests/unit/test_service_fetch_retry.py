"""What ``Service.moderate`` does with items whose S3 fetch failed transiently (real Redis;
the pipeline is a stand-in answering what ``Pipeline`` answers for such an item): the
message goes back to the queue, sharing the timeout retry count, and the items get
``fetch_failed`` verdicts only once the retries are spent. Permanent errors stay immediate."""

from concurrent.futures import Future
from contextlib import nullcontext

import pytest
import redis

from modgate import keys
from modgate.errors import ErrorCode, ModerationError
from modgate.settings import load_settings
from modgate.verdict import error_verdict
from tests.helpers import verdicts
from worker.ingest.fetch import TransientFetchError
from worker.service.service import Requeue, Service

MESSAGE = ({"items": [{"bucket": "bkt", "key": "a.jpg"}, {"bucket": "bkt", "key": "gone.jpg"}]},)


class S3Down:
    """a.jpg: S3 kept answering 503 through every attempt; gone.jpg: NoSuchKey. The
    verdicts are made the way ``Pipeline._guard`` makes them from the fetcher's error."""

    def admission(self, cancel=None):
        return nullcontext(True)

    def submit(self, source, request_id=None, policy=None, cancel=None):
        if source.key == "a.jpg":
            exc: ModerationError = TransientFetchError(f"{source.uri}: SlowDown: reduce (after 5 attempts)")
        else:
            exc = ModerationError(ErrorCode.NOT_FOUND, f"{source.uri}: NoSuchKey")
        future: Future = Future()
        future.set_result(error_verdict(source, policy.version, exc.code, exc.message, request_id=request_id))
        return future


@pytest.fixture
def svc(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    settings = load_settings(
        redis={"url": redis_server.url},
        worker={
            "message_timeout_s": 5.0,
            "visibility_timeout_s": 35,
            "timeout_retries": 2,
            "metrics_port": 0,
        },
        # No S3 here: error verdicts must not try to tag their objects (the default).
        policy={"errors": {"all": {"action": "none"}}},
    )
    service = Service(settings, ["modgate"], schedule=lambda d, c: None, redis=r)
    service.pipeline = S3Down()
    return service


def by_key(r) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for v in verdicts(r):
        out.setdefault(v["source"]["key"], []).append(v["error"]["code"])
    return out


def test_transient_fetch_failure_requeues_then_gives_fetch_failed_once_retries_are_spent(svc):
    for retry in (1, 2):
        with pytest.raises(Requeue, match="could not be fetched yet"):
            svc.moderate("task-1", MESSAGE, {})
        assert svc.redis.get(keys.message_retries("task-1")) == str(retry).encode()
        # The permanent error is a verdict at once; the transient one is not judged yet.
        assert by_key(svc.redis) == {"gone.jpg": ["not_found"]}
    counts = svc.moderate("task-1", MESSAGE, {})  # third delivery: retries spent
    assert counts["published"] == 1 and counts["duplicates"] == 1
    assert by_key(svc.redis) == {"gone.jpg": ["not_found"], "a.jpg": ["fetch_failed"]}
    (failed,) = [v for v in verdicts(svc.redis) if v["source"]["key"] == "a.jpg"]
    assert "transient" not in failed["error"]["message"]  # the generic text, not boto's
    assert svc.redis.get(keys.message_retries("task-1")) is None


def test_permanent_fetch_errors_do_not_requeue(svc):
    only_gone = ({"items": [{"bucket": "bkt", "key": "gone.jpg"}]},)
    counts = svc.moderate("task-2", only_gone, {})
    assert counts["published"] == 1
    assert svc.redis.get(keys.message_retries("task-2")) is None
